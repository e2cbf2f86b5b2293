"""Command line: move weights between Hugging Face DeepSeek-V3 directories and moe_train checkpoints.

import SRC DST   HF directory SRC -> model-only checkpoint DST/step_00000000 (DST: a checkpoints directory)
export SRC DST   moe_train checkpoint SRC (a step dir, a checkpoints dir or a run dir) -> HF directory DST
config SRC       print the model section for SRC's config.json (YAML, for configs/model/<name>.yaml)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from omegaconf import OmegaConf

from ..checkpoint import load_model_state, resolve_checkpoint, save_checkpoint
from ..config import ModelConfig, TrainConfig
from .convert import from_pretrained, read_hf_config, save_state_dict


def import_checkpoint(src: str, dst: str, dtype: str = "float32") -> str:
    """HF directory -> model-only moe_train checkpoint at step 0; returns the checkpoint's path.

    Its config.yaml is the default TrainConfig with the model section from config.json, so
    `python train.py trainer.resume=DST` plus that model section continues from these weights.
    """
    model = from_pretrained(src, device="cpu", dtype=dtype)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(TrainConfig(model=model.cfg)))
    trainer_state = {"step": 0, "hf_source": os.path.abspath(src)}
    return save_checkpoint(dst, 0, model.state_dict(), None, trainer_state, yaml)


def read_model_config(ckpt: str) -> ModelConfig:
    """The model section of a checkpoint's config.yaml as a ModelConfig."""
    with open(os.path.join(ckpt, "config.yaml"), encoding="utf-8") as f:
        section = OmegaConf.create(f.read()).get("model")
    if section is None:
        raise ValueError(f"{ckpt}/config.yaml has no model section")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))  # type: ignore[return-value]


def export_checkpoint(src: str, dst: str, dtype: str | None = None, max_shard_size: str = "5GB") -> str:
    """moe_train checkpoint -> HF directory; the model state is memory-mapped, the optimizer never read."""
    ckpt = resolve_checkpoint(src)
    cfg = read_model_config(ckpt)
    state = load_model_state(ckpt)
    save_state_dict(state, cfg, dst, dtype, max_shard_size)
    return ckpt


def model_yaml(src: str) -> str:
    cfg = asdict(read_hf_config(src))
    cfg.pop("init_from")
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moe_train.hf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> moe_train checkpoint")
    imp.add_argument("src")
    imp.add_argument("dst", help="checkpoints directory; the checkpoint is written to DST/step_00000000")
    imp.add_argument("--dtype", default="float32", help="float32 (default, master weights) | bfloat16")
    exp = sub.add_parser("export", help="moe_train checkpoint -> HF directory")
    exp.add_argument("src", help="a checkpoint (step_N), a checkpoints directory or a run directory")
    exp.add_argument("dst")
    exp.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: as stored)")
    exp.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MiB (default 5GB)")
    cfg = sub.add_parser("config", help="print the model section of an HF directory's config.json")
    cfg.add_argument("src")
    args = p.parse_args(argv)
    if args.cmd == "import":
        print(f"wrote {import_checkpoint(args.src, args.dst, args.dtype)}")
    elif args.cmd == "export":
        ckpt = export_checkpoint(args.src, args.dst, args.dtype, args.max_shard_size)
        print(f"wrote {args.dst} from {ckpt}")
    else:
        sys.stdout.write(model_yaml(args.src))
