"""`python -m moe_train.model.summary [overrides...]`: build the configured model on the meta device and
print its parameter counts (counted from the module and from the config formula) and FLOPs per token.

The meta device allocates nothing, so even the 671B DeepSeek-V3 shape is checked on a laptop.
"""

from __future__ import annotations

import math
import sys

import torch

from ..config import load_config, to_object, validate_model
from . import build_model, count_params, is_moe_layer, train_flops_per_token


def fmt_count(n: float) -> str:
    """n with a K/M/B/T suffix (two decimals)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n)) if math.isfinite(n) else str(n)


def module_counts(model: torch.nn.Module, cfg) -> tuple[int, int, int]:
    """(total excluding MTP, active excluding MTP, MTP) counted from the instantiated module."""
    total = mtp = 0
    inactive = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".experts." in name:
            inactive += p.numel() * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
    return total, total - inactive, mtp


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = to_object(load_config(overrides)).model
    if cfg.vocab_size is None:
        cfg.vocab_size = 257  # the byte tokenizer's vocabulary
    validate_model(cfg)
    model = build_model(cfg, device="meta")
    total, active, mtp = module_counts(model, cfg)
    formula = count_params(cfg)
    assert (total, active, mtp) == (formula.total, formula.active, formula.mtp_total), "count formula drifted"
    n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.num_hidden_layers))
    print(f"layers {cfg.num_hidden_layers} ({n_moe} MoE), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(f"total parameters (excl. MTP): {fmt_count(total)}  ({total:,})")
    print(f"active per token (excl. MTP): {fmt_count(active)}  ({active:,})")
    print(f"MTP modules:                  {fmt_count(mtp)}  ({mtp:,})")
    print(f"training FLOPs per token at seq 4096: {train_flops_per_token(cfg, 4096):.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
