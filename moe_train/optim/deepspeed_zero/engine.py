"""`DeepSpeedZero`: the optimizer engine (optim/engine.py) backed by DeepSpeed ZeRO; see the package doc.

DeepSpeed is reached only through `internals` (its table names every DeepSpeed attribute used here).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...config import DeepSpeedSection, OptimConfig
from ...model.memory import StateSharding
from ...parallel.expert import expert_param_names
from ...parallel.grads import reduce_ties
from ...parallel.mesh import Mesh
from ..master import kept_fp32
from ..param_groups import split_decay
from . import internals as ds
from .config import MeshMPU, build_ds_config

#: the keys of DeepSpeed's Adam state that carry per-element moments (the rest are scalars like `step`)
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")

#: bytes per parameter of ZeRO's partitioned optimizer state: fp32 master weight + AdamW's two moments
ZERO_STATE_BYTES = 12


def _ensure_process_group(mesh: Mesh) -> None:
    """DeepSpeed needs torch.distributed even in one process: a world of one over a free local port.
    It also reads LOCAL_RANK, which only launchers set."""
    os.environ.setdefault("LOCAL_RANK", str(mesh.local_rank))
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if mesh.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _register_expert_groups(mesh: Mesh) -> str:
    """Our ep/edp groups under the name DeepSpeed's MoE layer would give them (`ep_size_<ep>`)."""
    name = f"ep_size_{mesh.layout.ep}"
    ep_ranks = next(g for g in mesh.layout.ep_groups() if mesh.rank in g)
    edp_ranks = next(g for g in mesh.layout.edp_groups() if mesh.rank in g)
    ds.register_expert_groups(name, mesh.group("ep"), ep_ranks, mesh.group("edp"), edp_ranks)
    return name


def param_groups(
    model: nn.Module, optim: OptimConfig, moe_group: str | None, fp32: set[str] = frozenset()
) -> list[dict[str, Any]]:
    """Decay / no-decay groups, each split into dense and expert parts; expert parts are DeepSpeed MoE
    groups (`moe=True`, `name` = the expert group name). Dense parameters named in `fp32` (kept fp32 beside
    bf16 ones) get groups of their own: ZeRO flattens each group into one dtype. Empty groups are left out."""
    decay, skip = split_decay(model)
    experts = expert_param_names(model) if moe_group else set()
    params = dict(model.named_parameters())
    groups = []
    for label, names, wd in (("decay", decay, optim.weight_decay), ("no_decay", skip, 0.0)):
        dense = [n for n in names if n not in experts]
        for suffix, part in (
            ("", [n for n in dense if n not in fp32]),
            ("_fp32", [n for n in dense if n in fp32]),
        ):
            if part:
                groups.append(
                    {
                        "params": [params[n] for n in part],
                        "weight_decay": wd,
                        "name": f"dense_{label}{suffix}",
                    }
                )
        expert = [params[n] for n in names if n in experts]
        if expert:
            groups.append({"params": expert, "weight_decay": wd, "name": moe_group, "moe": True})
    return groups


class DeepSpeedZero:
    """The trainer's optimizer engine backed by DeepSpeed ZeRO; see the package docstring."""

    def __init__(
        self,
        model: nn.Module,
        ds_cfg: DeepSpeedSection,
        optim: OptimConfig,
        mesh: Mesh,
        batch_size: int,
        microbatches: int,
        owned: set[str] | None,
        run_dir: str | None,
        ties: list[tuple[Any, list[str]]] | None = None,
        bf16_master: bool = False,
    ) -> None:
        """bf16_master: the model's parameters become bf16 and ZeRO's partition holds their fp32 masters
        (`trainer.dtype=bf16_master`); otherwise they stay fp32 (under autocast when `trainer.dtype=bf16`)."""
        init_distributed, deepspeed_config = ds.resolve("init_distributed"), ds.resolve("config_class")
        self.model = model
        self.mesh = mesh
        self.ds_cfg = ds_cfg
        self.ties = ties or []
        self.bf16_master = bf16_master
        self._lows: dict[int, torch.Tensor] = {}  # parameters' own data while masters stand in for them
        _ensure_process_group(mesh)
        dp = mesh.layout.dp
        self.config = build_ds_config(ds_cfg, optim, batch_size, dp, microbatches, mesh.device, bf16_master)
        if run_dir and mesh.is_logging_rank:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "deepspeed_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config, f, indent=2)
        moe_group = None
        if mesh.layout.ep > 1:
            moe_group = _register_expert_groups(mesh)
            experts = expert_param_names(model)
            for name, p in model.named_parameters():
                if name in experts:
                    ds.mark_expert_param(p, moe_group)
        kept = kept_fp32(model) if bf16_master else set()  # routers and norm gains: dense parameters
        for name, p in model.named_parameters():
            if owned is not None and name not in owned:
                ds.mark_pipe_replicated(p)
            if name in kept:
                ds.mark_kept_fp32(p)
        mpu = MeshMPU(mesh)
        # DeepSpeed's comm wraps our process group rather than creating one
        init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        config_class = deepspeed_config(self.config, mpu)
        self.engine = ds.moe_engine_class()(
            args=None,
            model=model,
            optimizer=None,
            model_parameters=param_groups(model, optim, moe_group, kept),
            mpu=mpu,
            dist_init_required=False,
            config=self.config,
            config_class=config_class,
        )
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer: param_groups, zero_grad, state
        if mesh.layout.pp > 1:
            ds.span_stages(self.optimizer, mesh.group("pp"), mesh.device)

    @property
    def sharded_state(self) -> DeepSpeedZero:
        """Checkpoints read and write ZeRO's partitioned state by parameter name through this engine."""
        return self

    def state_sharding(self) -> StateSharding:
        """Dense state over dp, experts over expert-dp (with ep = 1 experts are ordinary dense parameters);
        gradients partitioned too from stage 2; master + moments on the host when offloaded."""
        lay = self.mesh.layout
        experts = expert_param_names(self.model) if lay.ep > 1 else set()
        n_expert = sum(p.numel() for n, p in self.model.named_parameters() if n in experts)
        return StateSharding(
            optimizer_bytes=ZERO_STATE_BYTES,
            dense_shards=lay.dp,
            expert_shards=lay.edp,
            expert_params=n_expert,
            grads_sharded=self.ds_cfg.zero_stage >= 2,
            offloaded=self.ds_cfg.offload_optimizer == "cpu",
            bf16_params=self.bf16_master,
        )

    # ------------------------------------------------------------------------------------ step
    def begin_step(self) -> None:
        """Nothing to prepare: ZeRO-2's gradient hooks run on every backward."""

    def backward(self, tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """A micro-batch's loss goes through DeepSpeed's backward, so ZeRO-2's gradient hooks see its
        boundaries (the loss is already weighted by its share of the global batch: no gas scaling). A
        pipeline stage's outputs backpropagate through autograd: ZeRO-1 only reduces at its step, and the
        config refuses ZeRO-2 with pipeline schedules."""
        if len(tensors) == 1 and tensors[0].dim() == 0:
            self.engine.backward(tensors[0] * grads[0], scale_wrt_gas=False)
        else:
            torch.autograd.backward(tensors, grads)

    #: DeepSpeed's optimizer decides on the host whether a step is applied
    skips_on_device = False

    def step(self, lr: float, skip: torch.Tensor | None = None) -> float:
        """Sum tied copies over pipeline ranks, then DeepSpeed reduces (over dp, experts over expert-dp),
        clips by the global norm and updates; returns the norm. `skip` is not taken (`skips_on_device`)."""
        if skip is not None:
            raise ValueError("DeepSpeed's engine takes no device skip flag")
        reduce_ties(self.model, self.ties, grad_of=lambda p: ds.step_gradient(self.optimizer, p))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def drop_step(self) -> None:
        """A skipped step: its gradients are dropped before any reduction."""
        self.zero_grad()

    def checkpoint_weights(self) -> contextlib.AbstractContextManager:
        """The weights checkpoints hold are fp32: the model's parameters themselves, or under bf16_master
        ZeRO's masters (`_masters_as_parameters`)."""
        return self._masters_as_parameters() if self.bf16_master else contextlib.nullcontext()

    @contextlib.contextmanager
    def _masters_as_parameters(self) -> Iterator[None]:
        """While entered, each parameter holds its full fp32 master in host memory, so checkpoint code saves
        and loads fp32 values under the usual names, in place, as with the torch engine's masters. On exit
        the masters are set from those values (a load changed them) and the bf16 parameters re-cast from
        them. Gathering a master is collective over the parameter's (expert-)dp group; one parameter is on
        the device at a time, as `named_state` does for the moments."""
        get_full_fp32, set_full_fp32 = ds.resolve("get_full_fp32"), ds.resolve("set_full_fp32")
        params = [p for _, p in self.model.named_parameters()]
        full = [
            (get_full_fp32(p) if p.requires_grad else p).detach().float().to("cpu", copy=True) for p in params
        ]
        self._lows = {id(p): p.data for p in params}
        for p, f in zip(params, full, strict=True):
            p.data = f
        try:
            yield
        finally:
            lows, self._lows = self._lows, {}
            for p in params:
                f, p.data = p.data, lows[id(p)]
                set_full_fp32(p, f.to(p.device))
                p.data.copy_(f)

    @contextlib.contextmanager
    def _own_data(self, p: nn.Parameter) -> Iterator[None]:
        """`p` on its own (device, bf16) data for a DeepSpeed call while the masters stand in for the
        parameters: DeepSpeed gathers a parameter's state in a buffer made like the parameter, and a host
        buffer cannot go through an NCCL collective."""
        low = self._lows.get(id(p))
        if low is None:
            yield
            return
        held, p.data = p.data, low
        try:
            yield
        finally:
            p.data = held

    # ------------------------------------------------------------------------------- state
    def named_state(self) -> dict[str, dict[str, Any]]:
        """Optimizer state keyed by parameter name, shaped like this rank's parameters (full over dp, this
        rank's expert slice), as the torch engine's state is: checkpoints move between engines and layouts.
        Collective over the dp / expert-dp groups."""
        get_full_state = ds.resolve("get_full_state")
        self._materialise_state()
        inner = self.optimizer.optimizer
        steps = [int(_step_of(inner.state.get(p, {}))) for g in inner.param_groups for p in g["params"]]
        step = max(steps) if steps else 0
        by_name: dict[str, dict[str, Any]] = {}
        for name, p in self.model.named_parameters():
            st: dict[str, Any] = {}
            for key in MOMENT_KEYS:
                with self._own_data(p):
                    val = get_full_state(p, key)
                if val is not None:  # one parameter's full moments at a time, parked in host memory
                    st[key] = val.detach().to("cpu", copy=True)
            if st:
                st["step"] = torch.tensor(float(step))
                by_name[name] = st
        return by_name

    def load_named_state(
        self, by_name: dict[str, dict[str, Any]], fit: Callable[[str, torch.Tensor], torch.Tensor]
    ) -> None:
        """Set master weights from the (already loaded) model and moments from a name-keyed state."""
        set_full_fp32, set_full_state = ds.resolve("set_full_fp32"), ds.resolve("set_full_state")
        self._materialise_state()
        step = 0
        for name, p in self.model.named_parameters():
            set_full_fp32(p, p.detach().float())
            saved = by_name.get(name)
            if not saved:
                continue
            for key in MOMENT_KEYS:
                if key in saved:
                    set_full_state(p, fit(name, saved[key]).float(), key)
            step = max(step, int(_step_of(saved)))
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                st = inner.state.get(p)
                if st is not None and "step" in st:
                    st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step

    def _materialise_state(self) -> None:
        """Make every parameter's view of the Adam moments valid: Adam creates its moments lazily at the
        first step, so they are created here if no step ran yet (a resume), then every link is redone."""
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            for p in g["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p),
                    }
        ds.relink_optimizer_state(self.optimizer)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state this rank holds: Adam moments ('dense', 'expert') and ZeRO's fp32 master
        partition ('master_dense', 'master_expert'; the torch engine has none, its weights are the master)."""
        out = {"dense": 0, "expert": 0, "master_dense": 0, "master_expert": 0}
        inner = self.optimizer.optimizer
        for g in inner.param_groups:
            kind = "expert" if g.get("moe") else "dense"
            for p in g["params"]:
                out[f"master_{kind}"] += p.numel() * p.element_size()
                for key in MOMENT_KEYS:
                    v = inner.state.get(p, {}).get(key)
                    if v is not None:
                        out[kind] += v.numel() * v.element_size()
        return out


def _step_of(state: dict[str, Any]) -> float:
    s = state.get("step", 0)
    return float(s.item() if torch.is_tensor(s) else s)
