"""Model math: shapes, causality, router rules, grouped GEMM vs reference, MTP, parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig
from moe_train.model import MoEStats, build_model, count_params
from moe_train.model.moe import BalanceLoss, Router, balance_terms
from moe_train.model.summary import module_counts
from moe_train.ops.grouped_gemm import expert_swiglu_grouped, expert_swiglu_reference


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(vocab_size=97), **kw)


def test_shapes_and_causal_mask():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 97, (2, 24))
    logits = model(x).logits
    assert logits.shape == (2, 24, 97)
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 12))
    logits_y = model(y).logits
    torch.testing.assert_close(logits[:, :12], logits_y[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[:, 12:], logits_y[:, 12:])


@pytest.mark.parametrize("q_lora", [None, 32])
def test_forward_backward_all_params_get_grad(q_lora):
    cfg = tiny(q_lora_rank=q_lora)
    model = build_model(cfg, BalanceLoss("seq", 1e-2), seed=0)
    x = torch.randint(0, 97, (2, 17))
    stats = MoEStats()
    out = model(x[:, :-1], x[:, 1:], stats)
    (out.lm_loss + 0.3 * out.mtp_loss + stats.balance_loss()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def _router(**kw) -> Router:
    r = Router(tiny(**kw))
    torch.nn.init.normal_(r.weight, std=0.5)
    return r


def test_bias_changes_selection_but_not_gate_values():
    torch.manual_seed(0)
    r = _router(n_group=1, topk_group=1)
    x = torch.randn(256, 128)
    base = r(x)
    r.e_score_correction_bias.copy_(torch.randn(16) * 0.5)
    biased = r(x)
    assert not torch.equal(base.topk_idx.sort(-1).values, biased.topk_idx.sort(-1).values)
    # gate values are the unbiased affinities of the chosen experts, renormalised
    s = torch.sigmoid(x @ r.weight.T)
    chosen = s.gather(1, biased.topk_idx)
    torch.testing.assert_close(biased.topk_weight, chosen / chosen.sum(-1, keepdim=True) * r.scale)


@pytest.mark.parametrize("groups", [1, 4])
def test_router_choice_is_topk_with_ties_to_the_lower_expert_eager_and_compiled(groups):
    """The router's choice is a stable sort (`top_k_stable`, which Inductor fuses where topk stays a
    kernel of its own): the experts topk would choose, largest first, and on ties — every score equal, as
    under a zeroed router — the lowest ids, the same compiled as eager."""
    torch.manual_seed(0)
    r = _router(n_group=groups, topk_group=min(groups, 2))
    x = torch.randn(64, 128)
    out = r(x)
    choice = (torch.sigmoid(x @ r.weight.T) + r.e_score_correction_bias).gather(1, out.topk_idx)
    assert torch.all(choice[:, :-1] >= choice[:, 1:])  # largest first
    if groups == 1:
        ref = torch.sigmoid(x @ r.weight.T).topk(r.top_k, dim=-1).indices
        assert torch.equal(out.topk_idx, ref)
    with torch.no_grad():
        r.weight.zero_()
    tied = r(x).topk_idx
    assert torch.equal(tied, torch.arange(r.top_k).expand(64, -1))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(r, dynamic=False)(x).topk_idx, tied)
    torch._dynamo.reset()


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_gate_weights_sum_to_scaling_factor(scale):
    r = _router(routed_scaling_factor=scale)
    out = r(torch.randn(64, 128))
    torch.testing.assert_close(out.topk_weight.sum(-1), torch.full((64,), scale))


def test_gates_unnormalised_when_norm_topk_prob_false():
    r = _router(norm_topk_prob=False, routed_scaling_factor=2.0)
    x = torch.randn(32, 128)
    out = r(x)
    s = torch.sigmoid(x @ r.weight.T)
    torch.testing.assert_close(out.topk_weight, s.gather(1, out.topk_idx) * 2.0)


def test_group_limited_routing_never_picks_masked_group():
    torch.manual_seed(1)
    r = _router(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=4)
    r.e_score_correction_bias.copy_(torch.randn(32) * 0.3)
    x = torch.randn(512, 128)
    out = r(x)
    biased = torch.sigmoid(x @ r.weight.T) + r.e_score_correction_bias
    group_score = biased.view(512, 8, 4).topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices  # (N, 2)
    groups_used = out.topk_idx // 4
    assert all(set(groups_used[i].tolist()) <= set(allowed[i].tolist()) for i in range(512))
    assert max(len(set(g.tolist())) for g in groups_used) <= 2


def test_softmax_scoring_routes_by_probability():
    r = _router(scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False)
    x = torch.randn(16, 128)
    out = r(x)
    p = torch.softmax(x @ r.weight.T, -1)
    torch.testing.assert_close(out.topk_idx.sort(-1).values, p.topk(4, -1).indices.sort(-1).values)


def test_grouped_gemm_equals_reference():
    torch.manual_seed(0)
    E, H, inner = 6, 32, 16
    counts = torch.tensor([5, 0, 17, 3, 0, 7])
    x = torch.randn(int(counts.sum()), H)
    w_gu, w_d = torch.randn(E, 2 * inner, H), torch.randn(E, H, inner)
    ref = expert_swiglu_reference(x, counts, w_gu, w_d)
    grouped = expert_swiglu_grouped(x, counts, w_gu, w_d)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-5)


def test_direct_experts_layer_equals_the_dispatched_one():
    """A MoE layer of few rows computing each chosen expert straight from its weights (`direct_rows`, the
    decode path of compiled phases; here uncompiled) gives the dispatched layer's output and gradients, and
    past `direct_rows` the layer dispatches as before."""
    from moe_train.model.moe import MoE

    torch.manual_seed(0)
    cfg = tiny(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)
    layer = MoE(cfg, 0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer.gate.e_score_correction_bias.normal_()
    x = torch.randn(1, 3, 32)
    got, want = {}, {}
    for rows, out in ((3, got), (0, want)):
        layer.direct_rows = rows
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        out.update(y=y, x=xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()})
        layer.zero_grad()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    layer.direct_rows = 2  # 3 rows: dispatched again, the same values
    torch.testing.assert_close(layer(x), want["y"], rtol=0, atol=0)


def test_gates_in_the_experts_activation_equal_the_weighted_combine(monkeypatch):
    """The routed experts weigh each row by its gate inside their activation, so the combine is a plain sum
    and its backward a plain gather: no pass of per-row dot products over the N·k rows (the gates' gradient
    comes from the activation's backward). The layer's output and every gradient, the router's included,
    equal the combine-weighted form's (what FP8 experts keep, `RoutedExperts.weighs_rows`)."""
    from moe_train.model.moe import MoE, RoutedExperts
    from moe_train.ops import gather

    torch.manual_seed(0)
    cfg = tiny(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)
    layer = MoE(cfg, 0).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    dots = []
    real_dots = gather._bag_dots
    monkeypatch.setattr(gather, "_bag_dots", lambda *a: dots.append(1) or real_dots(*a))
    results = {}
    for weighs in (True, False):
        monkeypatch.setattr(RoutedExperts, "weighs_rows", property(lambda self, w=weighs: w))
        dots.clear()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        results[weighs] = dict(y=y, x=xi.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()})
        results[weighs]["dot passes"] = len(dots)
        layer.zero_grad()
    assert results[True].pop("dot passes") == 0 and results[False].pop("dot passes") == 1
    assert layer.gate.weight.grad is None and results[True]["gate.weight"].abs().sum() > 0
    for k, want in results[False].items():
        torch.testing.assert_close(
            results[True][k], want, rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_reference_experts_with_no_tokens_still_connect_weights():
    w_gu = torch.randn(2, 8, 4, requires_grad=True)
    w_d = torch.randn(2, 4, 4, requires_grad=True)
    out = expert_swiglu_reference(torch.zeros(0, 4), torch.tensor([0, 0]), w_gu, w_d)
    out.sum().backward()
    assert w_gu.grad is not None and torch.count_nonzero(w_gu.grad) == 0


def test_reference_experts_backward_writes_each_weight_stack_once():
    """The CPU experts' weight gradient is one stack of the E per-expert gradients, not E whole-stack zero
    tensors (one per `w[e]`): the per-expert gradients equal a per-expert autograd's, and the graph holds no
    per-expert select."""
    E, H, inner = 5, 8, 6
    counts = torch.tensor([3, 0, 4, 2, 1])
    x = torch.randn(int(counts.sum()), H)
    w_gu = torch.randn(E, 2 * inner, H, requires_grad=True)
    w_d = torch.randn(E, H, inner, requires_grad=True)
    out = expert_swiglu_reference(x, counts, w_gu, w_d)
    seen, stack, nodes = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(type(node).__name__)
        stack += [n for n, _ in node.next_functions]
    assert "SelectBackward0" not in nodes and nodes.count("UnbindBackward0") == 2
    out.square().sum().backward()
    for e, xe in enumerate(torch.split(x, counts.tolist())):
        gu_e, d_e = w_gu[e].detach().requires_grad_(), w_d[e].detach().requires_grad_()
        g, u = F.linear(xe, gu_e).chunk(2, dim=-1)
        F.linear(F.silu(g) * u, d_e).square().sum().backward()
        want_gu = torch.zeros_like(gu_e) if gu_e.grad is None else gu_e.grad
        torch.testing.assert_close(w_gu.grad[e], want_gu, rtol=1e-5, atol=1e-6)


def test_mtp_loss_present_and_predicts_two_ahead():
    cfg = tiny(num_nextn_predict_layers=1)
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 97, (2, 20))
    out = model(x[:, :-1], x[:, 1:])
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    # recompute the MTP loss by hand: position i combines the main model's normalised h_i with
    # Emb(t_{i+1}) and predicts t_{i+2}
    inp, lab = x[:, :-1], x[:, 1:]
    h = model.norm(model.hidden_states(inp))
    layer = model.mtp[0]
    h1 = layer(h[:, :-1], model.embed_tokens(lab[:, :-1]), None)
    ref = torch.nn.functional.cross_entropy(
        model.lm_head(layer.norm(h1)).flatten(0, 1), lab[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.mtp_loss, ref)
    no_mtp = build_model(tiny(num_nextn_predict_layers=0), seed=0)
    assert no_mtp(inp, lab).mtp_loss is None


def test_balance_terms_uniform_routing_is_one():
    # perfectly uniform affinities and loads give sum f_i P_i = 1 (the minimum)
    from moe_train.model.moe import Routing

    n, e, k = 64, 8, 2
    idx = torch.arange(n * k).view(n, k) % e
    routing = Routing(idx, torch.ones(n, k), torch.full((n, e), 0.5))
    assert balance_terms(routing, 4, 16, "seq").item() == pytest.approx(1.0)
    assert balance_terms(routing, 4, 16, "batch").item() == pytest.approx(1.0)
    # all tokens on experts 0 and 1, which also hold the highest affinities: the loss grows
    scores = torch.full((n, e), 0.1)
    scores[:, :2] = 0.9
    skewed = Routing(torch.zeros(n, k, dtype=torch.long) + torch.tensor([0, 1]), torch.ones(n, k), scores)
    assert balance_terms(skewed, 4, 16, "batch").item() > 2.0


def test_param_counts_match_module_and_dsv3_published_sizes():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    total, active, mtp = module_counts(model, cfg)
    p = count_params(cfg)
    assert (total, active, mtp) == (p.total, p.active, p.mtp_total)
    assert total + mtp == sum(q.numel() for q in model.parameters())
    from moe_train.config import load_config, to_object

    v3 = to_object(load_config(["model=deepseek_v3"])).model
    meta = build_model(v3, device="meta")
    counts = module_counts(meta, v3)
    assert abs(counts[0] / 671e9 - 1) < 0.02 and abs(counts[1] / 37e9 - 1) < 0.02


def test_init_is_deterministic_and_per_expert():
    a = build_model(tiny(), seed=3)
    b = build_model(tiny(), seed=3)
    c = build_model(tiny(), seed=4)
    for (n, p), (_, q), (_, r) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
        if "norm" not in n:
            assert not torch.equal(p, r), n
    w = a.layers["1"].mlp.experts.gate_up_proj
    assert not torch.equal(w[0], w[1])


def test_router_handles_zero_tokens_with_groups():
    """An expert-parallel rank may get an empty micro-batch shard; group-limited routing must not choke."""
    r = _router(n_group=4, topk_group=2)
    out = r(torch.zeros(0, 128))
    assert out.topk_idx.shape == (0, 4) and out.topk_weight.shape == (0, 4)
