"""`train.py` with a chosen set of parameters kept fp32 under `trainer.dtype=bf16_master` (the numerics
ablation of the single-GPU speed issue, docs/performance.md "Numerics of the new default").

bf16_master keeps the routers and the RMSNorm gains fp32 (`optim.master.kept_fp32`); this wrapper replaces
that set to compare the alternatives on the GPU, for loss and for speed:

    python bench/keep_fp32.py routers|norm|emb+norm model=small trainer.max_steps=1000 ...

`routers` stores the norm gains in bf16 too; `norm` is the library's choice; `emb+norm` also keeps the
embedding fp32 (on CPU that reproduces the old fp32-weights-under-autocast path bit for bit). Only the
benchmark changes what is kept.
"""

from __future__ import annotations

import os
import runpy
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_train.optim.master as master  # noqa: E402
from moe_train.model.moe import Router  # noqa: E402
from moe_train.model.norm import RMSNorm  # noqa: E402

KINDS = {"routers": (Router,), "norm": (Router, RMSNorm), "emb+norm": (Router, RMSNorm, nn.Embedding)}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        sys.exit(f"usage: python bench/keep_fp32.py {{{' | '.join(KINDS)}}} [train.py overrides]")
    name = sys.argv[1]
    kinds = KINDS[name]

    def kept(model: nn.Module) -> set[str]:
        out = {
            f"{mod_name}.{n}"
            for mod_name, m in model.named_modules()
            if isinstance(m, kinds)
            for n, _ in m.named_parameters(recurse=False)
        }
        print(f"keep_fp32 {name}: {len(out)} parameters stay fp32", flush=True)
        return out

    master.kept_fp32 = kept  # MasterWeights reads it from the module at construction
    train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    sys.argv = [train, *sys.argv[2:]]
    runpy.run_path(train, run_name="__main__")


if __name__ == "__main__":
    main()
