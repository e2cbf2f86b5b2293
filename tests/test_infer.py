"""Inference: the latent cache reproduces the training forward, absorbed = plain, batching, sampling, CLI,
the static (CUDA-graph-capturable) decode step and the graph fallback where capture is impossible.

Everything is fp32 on CPU with tiny random models whose selection biases are non-zero, so the router's
bias path is exercised.  transformers' DeepseekV3ForCausalLM.generate is the outside reference for greedy
decoding of an HF directory.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from moe_train.checkpoint import save_checkpoint
from moe_train.config import ModelConfig, TrainConfig
from moe_train.generate import main as generate_main
from moe_train.infer import (
    DecodeStep,
    GraphFallbackWarning,
    InferenceModel,
    SamplingConfig,
    filter_logits,
    forward_step,
    generate,
    graph_unsupported_reason,
    load_for_inference,
    mha_cache_elements,
    mla_cache_elements,
    new_cache,
    sample,
)
from moe_train.model import build_model
from moe_train.model.transformer import Transformer

TOL = 1e-5
BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.1,
    num_nextn_predict_layers=1,
)
CASES = {
    "lora_q": dict(q_lora_rank=24),
    "full_q_yarn": dict(
        q_lora_rank=None,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls are fastest on one thread, and far slower when a loaded machine oversubscribes cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def set_biases(model: torch.nn.Module, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, t in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)


def tiny(case: str = "lora_q", seed: int = 0) -> Transformer:
    model = build_model(ModelConfig(**{**BASE, **CASES[case]}), seed=seed).eval()
    set_biases(model)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ids(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decode_reproduces_full_forward_at_every_position(case, absorb):
    model = tiny(case)
    x = ids((2, 24))
    with torch.no_grad():
        ref = model(x, return_logits=True).logits
    cache = new_cache(model, 2, 24)
    prefix = 5  # a prefill chunk, then one token at a time
    steps = [forward_step(model, x[:, :prefix], torch.arange(prefix).expand(2, prefix), cache, absorb)]
    for t in range(prefix, 24):
        steps.append(forward_step(model, x[:, t : t + 1], torch.full((2, 1), t), cache, absorb))
    assert rel_err(torch.cat(steps, dim=1), ref) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_absorbed_path_equals_plain_path(case):
    model = tiny(case)
    x = ids((3, 16), seed=1)
    pos = torch.arange(16).expand(3, 16)
    outs = {}
    for absorb in (False, True):
        cache = new_cache(model, 3, 20)
        prefill = forward_step(model, x, pos, cache, absorb)
        decode = forward_step(model, x[:, :1], torch.full((3, 1), 16), cache, absorb)
        outs[absorb] = (prefill, decode, cache.kv[0].clone())
    for a, b in zip(outs[True], outs[False], strict=True):
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_only_latent_and_rope_key(dtype):
    model = tiny()
    cfg = model.cfg
    cache = new_cache(model, batch=3, max_len=10, dtype=dtype)
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    assert cache.bytes_per_token_per_layer() == per_token
    assert cache.nbytes() == cfg.num_hidden_layers * 3 * 10 * per_token
    assert mla_cache_elements(cfg) == 40 and mha_cache_elements(cfg) == 2 * 4 * 16


def test_bf16_cache_stays_close_to_fp32():
    model = tiny()
    x = ids((2, 12), seed=2)
    pos = torch.arange(12).expand(2, 12)
    full = forward_step(model, x, pos, new_cache(model, 2, 12), absorb=True)
    half = forward_step(model, x, pos, new_cache(model, 2, 12, torch.bfloat16), absorb=True)
    assert rel_err(half, full) <= 5e-2


@torch.no_grad()
def test_prefill_logits_at_last_tokens_equal_full_logits():
    model = InferenceModel(tiny())
    x, lengths = ids((3, 10), seed=5), torch.tensor([10, 4, 7])
    pos = torch.arange(10).expand(3, 10)
    full = model(x, pos, model.new_cache(3, 10), absorb=False)
    last = model(x, pos, model.new_cache(3, 10), absorb=False, last=lengths - 1)
    assert last.shape == (3, 1, BASE["vocab_size"])
    assert rel_err(last[:, 0], full[torch.arange(3), lengths - 1]) <= TOL


# ------------------------------------------------------------------------------------------ static decode


@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "plain"])
@torch.no_grad()
def test_static_decode_step_equals_dynamic_decode(absorb):
    """The graph-capturable step (all max_len slots read, mask only, no host reads in attention), run
    eagerly, gives the logits of the ordinary step at every decode step of an unequal batch."""
    model = InferenceModel(tiny("full_q_yarn"))
    lengths = torch.tensor([3, 9, 1])
    x = ids((3, 9), seed=6)
    steps = {}
    for static in (False, True):
        cache = model.new_cache(3, 9 + 8)
        model(x, torch.arange(9).expand(3, 9), cache, absorb=False)
        cache.lengths.copy_(lengths)
        step = DecodeStep(model, cache, absorb, static)
        assert step.capture() is not None and step.graph is None  # CPU: nothing captured
        feed = ids((3, 8), seed=7)
        steps[static] = (torch.stack([step(feed[:, t]) for t in range(8)]), cache)
    (dyn, dyn_cache), (sta, sta_cache) = steps[False], steps[True]
    assert sta.shape == (8, 3, BASE["vocab_size"])
    assert rel_err(sta, dyn) <= TOL
    assert torch.equal(sta.argmax(-1), dyn.argmax(-1))
    assert torch.equal(sta_cache.lengths, lengths + 8) and torch.equal(dyn_cache.lengths, lengths + 8)
    assert torch.equal(sta_cache.kv[0], dyn_cache.kv[0])  # layer 0's latents depend on the ids alone
    for layer in sta_cache.kv:
        assert rel_err(sta_cache.kv[layer], dyn_cache.kv[layer]) <= TOL


@torch.no_grad()
def test_greedy_step_ends_in_the_argmax_and_feeds_itself():
    """greedy=True: the step returns the argmax of the logits step's output, held in its own input buffer, so
    feeding it back runs the next step with no copy, and the chain equals logits steps sampled greedily."""
    model = InferenceModel(tiny())
    x, lengths = ids((2, 6), seed=8), torch.tensor([6, 4])
    runs = {}
    for greedy in (False, True):
        cache = model.new_cache(2, 6 + 5)
        model(x, torch.arange(6).expand(2, 6), cache, absorb=False)
        cache.lengths.copy_(lengths)
        step, tok, seq = DecodeStep(model, cache, True, True, greedy), x[torch.arange(2), lengths - 1], []
        for _ in range(5):
            out = step(tok)
            tok = out if greedy else out.argmax(-1)
            seq.append(tok.clone())
        runs[greedy] = torch.stack(seq)
        if greedy:
            assert out.data_ptr() == step.ids.data_ptr()
    assert torch.equal(runs[True], runs[False])


@pytest.mark.slow
def test_compiled_phases_decode_like_eager_with_one_attention_graph_for_all_layers():
    """Compiled decode on CUDA: each block's phases compiled (model/compile.py, as `generate --compile` does),
    with the decode step's routed experts straight from the chosen experts' weights and the kernels tuned
    (`direct_experts=True, tuned=True`, as generate --compile and bench/decode.py run it), and the static
    step. Here the static step runs eagerly on CPU through the compiled phases: the same logits; every
    layer's attention served by one compiled graph per shape (prefill, decode): the layer's cache buffer is
    an argument, where an index would be a constant that recompiles per layer; the decode step's 2 rows took
    the direct experts (one graph per stage for every layer, the stages apart so the activation between them
    is written once), the prefill's 12 the dispatched ones."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from moe_train.model.compile import compile_phases
    from moe_train.model.moe import RoutedExperts
    from moe_train.model.transformer import DecoderLayer

    torch._dynamo.reset()
    out = {}
    for compiled in (False, True):
        model = tiny("lora_q")
        if compiled:
            assert compile_phases(model, direct_experts=True, tuned=True) > 0
            assert {m.direct_rows for m in model.moe_layers()} == {2}
        im = InferenceModel(model)
        cache = im.new_cache(2, 16)
        with torch.no_grad():
            im(ids((2, 6), seed=3), torch.arange(6).expand(2, 6), cache, absorb=False)
            cache.lengths.fill_(6)
            step = DecodeStep(im, cache, True, static=True)
            feed = ids((2, 5), seed=4)
            out[compiled] = torch.stack([step(feed[:, t]) for t in range(5)])
    assert rel_err(out[True], out[False]) <= TOL
    assert BASE["num_hidden_layers"] >= 3
    assert len(_debug_get_cache_entry_list(DecoderLayer.attention.__code__)) == 2
    for stage in (RoutedExperts.direct_hidden, RoutedExperts.direct_down):
        assert len(_debug_get_cache_entry_list(stage.__code__)) == 1
    assert not _debug_get_cache_entry_list(RoutedExperts.direct.__code__)
    assert len(_debug_get_cache_entry_list(RoutedExperts.forward.__code__)) == 1
    torch._dynamo.reset()


def test_cuda_graph_falls_back_on_cpu_with_the_reason():
    model = tiny()
    prompts = [ids((1, n), seed=20 + n)[0].tolist() for n in (2, 6)]
    eager = generate(model, prompts, max_new_tokens=8)
    with pytest.warns(GraphFallbackWarning, match="the model is on cpu, and CUDA graphs need a CUDA device"):
        graphed = generate(model, prompts, max_new_tokens=8, cuda_graph=True)
    assert graphed.tokens == eager.tokens
    assert graphed.decode_path == eager.decode_path == "eager"
    assert graphed.graph_fallback == graph_unsupported_reason(InferenceModel(model))
    assert "cpu" in graphed.graph_fallback and eager.graph_fallback is None


# ------------------------------------------------------------------------------------------ generation


def test_batched_unequal_prompts_equal_one_by_one():
    model = tiny()
    prompts = [ids((1, n), seed=n)[0].tolist() for n in (3, 11, 1, 7)]
    batched = generate(model, prompts, max_new_tokens=12)
    for p, toks in zip(prompts, batched.tokens, strict=True):
        assert generate(model, [p], max_new_tokens=12).tokens[0] == toks
    assert generate(model, prompts, 12, absorb=False).tokens == batched.tokens
    assert batched.prefill_tokens == sum(map(len, prompts))
    assert batched.decode_tokens == 4 * 11


def test_stop_tokens_end_a_row_but_not_the_batch():
    model = tiny()
    prompts = [ids((1, 4), seed=3)[0].tolist(), ids((1, 9), seed=4)[0].tolist()]
    free = generate(model, prompts, max_new_tokens=10).tokens
    stop = free[0][3]
    if stop in free[1]:
        pytest.skip("the stop token also occurs in the other row (seed-dependent)")
    stopped = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    cut = free[0].index(stop) + 1
    assert stopped.tokens == [free[0][:cut], free[1]]
    assert stopped.stopped == [True, False]


def test_decode_queues_the_next_step_before_reading_a_token_and_stops_one_step_later():
    """The host reads step i's tokens after step i+1 is queued, so the device never waits on the host's
    read; streamed tokens stay in order and equal the free run's, and a batch that stops costs one step."""
    model = InferenceModel(tiny())
    prompts = [ids((1, 5), seed=5)[0].tolist()]
    free = generate(model, prompts, max_new_tokens=8).tokens[0]
    forwards, seen = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))

    def on_token(row: int, tok: int) -> None:
        seen.append((tok, len(forwards)))

    stop = free[4]
    cut = free.index(stop) + 1
    out = generate(model, prompts, max_new_tokens=8, stop_tokens=[stop], on_token=on_token)
    assert out.tokens == [free[:cut]] and [t for t, _ in seen] == free[:cut]
    # token j (0: the prefill's) is read after forward j+1 (the prefill is forward 0) has been queued
    assert [n for _, n in seen] == [1] + [j + 2 for j in range(1, cut)]
    assert len(forwards) == cut + 1  # the prefill, cut - 1 kept steps, one step past the stop


def test_sampling_filters_and_is_reproducible():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.9, -5.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, True, True, False]]
    # p = softmax([2, 1, .5, -1]) = [.61, .22, .14, .03]: top-p 0.7 keeps the first two
    assert filter_logits(logits[:1], top_k=0, top_p=0.7).isfinite().tolist() == [[True, True, False, False]]
    assert sample(logits, SamplingConfig(1.0, top_k=1)).tolist() == [0, 1]  # top-1 is greedy
    assert sample(logits, SamplingConfig(1.0, top_p=1e-6)).tolist() == [0, 1]
    model = tiny()
    cfg = SamplingConfig(temperature=0.9, top_k=20, top_p=0.9, seed=5)
    a = generate(model, [[1, 2, 3]], 10, cfg).tokens
    assert a == generate(model, [[1, 2, 3]], 10, cfg).tokens
    assert a != generate(model, [[1, 2, 3]], 10, replace(cfg, seed=6)).tokens
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)


# ------------------------------------------------------------------------------------------ loading, CLI


def byte_model_checkpoint(run_dir: str) -> Transformer:
    """A tiny model over the byte tokenizer's vocabulary, saved as run_dir's checkpoint of step 5."""
    cfg = ModelConfig(**{**BASE, **CASES["lora_q"], "vocab_size": 257})
    model = build_model(cfg, seed=3).eval()
    set_biases(model)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(TrainConfig(model=cfg)))
    save_checkpoint(os.path.join(run_dir, "checkpoints"), 5, model.state_dict(), None, {"step": 5}, yaml)
    return model


def test_checkpoint_generates_through_cli(tmp_path):
    model = byte_model_checkpoint(str(tmp_path))
    loaded = load_for_inference(str(tmp_path))  # the run dir: its latest checkpoint
    assert len(loaded.model.mtp) == 0  # MTP is not used for generation, so not loaded
    x = ids((1, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(x, return_logits=True).logits, model(x, return_logits=True).logits)
    out, err = io.StringIO(), io.StringIO()
    argv = [str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "6", "--no-eod-stop"]
    result = generate_main(argv, out, err)
    expected = generate(model, [list("héllo".encode())], 6).tokens
    assert result.tokens == expected
    text = bytes(t for t in expected[0] if t < 256).decode("utf-8", errors="replace")
    assert out.getvalue() == "héllo" + text + "\n"
    assert "prefill:" in err.getvalue() and "decode:" in err.getvalue() and "tokens/s" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert generate_main([*argv, "--cuda-graph"], out, err).tokens == expected
    reason = "the model is on cpu, and CUDA graphs need a CUDA device"
    assert f"cuda graph: not used, decoding eagerly: {reason}\n" in err.getvalue()
    with pytest.raises(SystemExit, match="--compile works with --device cuda"):
        generate_main([*argv, "--compile"], out, err)


def test_hf_model_greedy_tokens_match_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.utils.logging.set_verbosity_error()
    kw = {k: v for k, v in BASE.items() if k != "num_nextn_predict_layers"}
    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(
        **kw,
        q_lora_rank=24,
        num_key_value_heads=4,
        first_k_dense_replace=1,
        n_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DeepseekV3ForCausalLM(hf_cfg).eval()
    set_biases(ref)
    ref.save_pretrained(tmp_path)
    ours = load_for_inference(str(tmp_path)).model
    prompts = [ids((1, n), seed=10 + n)[0].tolist() for n in (5, 9)]
    mine = generate(ours, prompts, max_new_tokens=10).tokens
    for p, toks in zip(prompts, mine, strict=True):
        with torch.no_grad():
            theirs = ref.generate(
                torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert theirs[0, len(p) :].tolist() == toks
