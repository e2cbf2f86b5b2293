"""`train.py` with more parameters kept fp32 under `trainer.dtype=bf16_master` (the numerics ablation).

The bf16_master default (bf16 parameters, fp32 masters) ends `model=small` 1.31% lower in validation loss than
the old path (fp32 weights under bf16 autocast; docs/performance.md, "Numerics of the new default"). On CPU
the two are identical bit for bit once the embedding and every RMSNorm weight also stay fp32, so the gap comes
from those weights being stored in bf16, which makes the residual stream and the norms' outputs bf16. This
wrapper runs the trainer with `optim.master.kept_fp32` widened to find out which of the two on the GPU:

    python bench/keep_fp32.py emb+norm model=small trainer.max_steps=1000 ...   (emb | norm | emb+norm)

Only the benchmark changes what is kept; the library's default is untouched.
"""

from __future__ import annotations

import os
import runpy
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_train.optim.master as master  # noqa: E402
from moe_train.model.norm import RMSNorm  # noqa: E402

KINDS = {"emb": (nn.Embedding,), "norm": (RMSNorm,), "emb+norm": (nn.Embedding, RMSNorm)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: python bench/keep_fp32.py {{{' | '.join(KINDS)}}} [train.py overrides]")
    name, routers = sys.argv[1], master.kept_fp32
    kinds = KINDS[name]

    def kept(model: nn.Module) -> set[str]:
        out = routers(model)
        for mod_name, m in model.named_modules():
            if isinstance(m, kinds):
                out.update(f"{mod_name}.{n}" for n, _ in m.named_parameters(recurse=False))
        print(f"keep_fp32 {name}: {len(out)} parameters stay fp32", flush=True)
        return out

    master.kept_fp32 = kept  # MasterWeights reads it from the module at construction
    train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    sys.argv = [train, *sys.argv[2:]]
    runpy.run_path(train, run_name="__main__")


if __name__ == "__main__":
    main()
