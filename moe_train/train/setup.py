"""What a training run is built from: data, the rank's model and the executor that runs its steps.

Every layout builds the same way: a schedule (1F1B over one stage when pp = 1), the partial model this
pipeline rank holds with its expert slice, dispatchers over the mesh, and one executor. The trainer only
drives what is built here.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..balance import balance_loss_spec
from ..config import ConfigError, TrainConfig
from ..data import GlobalBatchSampler, build_dataset
from ..data.mixture import MixtureDataset, MixtureSampler, load_mixture
from ..data.sampler import rank_rows
from ..model import Transformer, is_moe_layer, train_flops_per_token
from ..model.accounting import attention_flops_per_pair
from ..model.compile import compile_mode, compile_phases
from ..model.documents import Documents
from ..model.fp8 import convert_to_fp8
from ..model.memory import MemoryEstimate, estimate_memory
from ..model.recompute import set_recompute
from ..ops.fp8 import scaled_mm_available
from ..ops.fp8_experts import fp8_experts_on_device
from ..optim.master import param_dtype, precision
from ..parallel.dispatch import BOUNDED, CommCounters
from ..parallel.dispatch.bounded import bounded_memory
from ..parallel.dispatch.direct import direct_memory
from ..parallel.expert import apply_expert_parallel, expert_slice
from ..parallel.mesh import Mesh
from ..parallel.overlap import OverlapEngine
from ..parallel.pipeline.analysis import peak_activations
from ..parallel.pipeline.executor import PipelineExecutor
from ..parallel.pipeline.graphed import GraphedMicroBatch, one_stage_order
from ..parallel.pipeline.schedules import schedule_for
from ..parallel.pipeline.stages import build_ties, rank_model_and_stages

KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for every precision but fp32 (`optim.master.precision` resolves `auto`); under
    bf16_master autocast keeps the ops it runs in fp32 (softmax, losses) there and lets fp32 inputs meet bf16
    weights."""
    return None if precision(cfg.trainer.dtype, device) == "fp32" else torch.bfloat16


def peak_tflops(cfg_value: float | None, device: torch.device) -> float | None:
    if cfg_value:
        return cfg_value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class Data:
    dataset: Any  # TokenDataset, or MixtureDataset for data.name=mixture
    sampler: GlobalBatchSampler | MixtureSampler
    microbatches: int = 1  # parallel.microbatches: how this rank's rows are cut

    @property
    def val(self) -> np.ndarray | dict[str, np.ndarray]:
        """Evaluation's validation stream, or one per mixture source by name (train/evaluation.py)."""
        return self.dataset.val

    def source_losses(
        self, step: int, mesh: Mesh, rows: dict[int, torch.Tensor], totals: Any
    ) -> dict[str, float | None]:
        """A mixture's `lm_loss/NAME`: the mean LM loss of step `step`'s sequences from each source (None
        for a source with none this step), from the per-sequence losses of this rank's micro-batches
        (`rows`, on ranks holding the head) summed over every rank; {} for a single corpus. Every rank
        calls it: the sum is a collective."""
        if not isinstance(self.sampler, MixtureSampler):
            return {}
        src = self.sampler.sources(step)
        lo, _, per_mb = rank_rows(len(src), mesh.dp_rank, mesh.layout.dp, self.microbatches)
        sums = np.zeros(len(self.dataset.sources))
        for mb, losses in rows.items():
            start = lo + mb * per_mb
            np.add.at(sums, src[start : start + per_mb], losses.float().cpu().numpy())
        counts = np.bincount(src, minlength=len(sums))
        totals_ = totals.values(sums.tolist())
        return {
            f"lm_loss/{s.name}": (t / int(c) if c else None)
            for s, t, c in zip(self.dataset.sources, totals_, counts, strict=True)
        }


def build_data(cfg: TrainConfig) -> Data:
    """The corpus and the global-batch sampler; resolves `model.vocab_size`."""
    d, t = cfg.data, cfg.trainer
    data = load_mixture(d) if d.name == "mixture" else build_dataset(d)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size}); set model.vocab_size >= {data.vocab_size} or null"
        )
    if isinstance(data, MixtureDataset):
        streams, weights = [c.train for c in data.corpora], [s.weight for s in data.sources]
        sampler = MixtureSampler(streams, weights, d.seq_len, d.batch_size, t.seed)
        return Data(data, sampler, cfg.parallel.microbatches)
    return Data(data, GlobalBatchSampler(data.train, d.seq_len, d.batch_size, t.seed))


def document_finder(cfg: TrainConfig, data: Data) -> Callable[[torch.Tensor], Documents] | None:
    """How a micro-batch's documents are found: by the corpus's end-of-document token, where
    `data.document_mask` is on and the corpus has documents; None: every row is one causal sequence."""
    d = cfg.data
    if not d.document_mask or not getattr(data.dataset, "documents", True):
        return None
    reset = d.reset_positions is not False
    return functools.partial(Documents.of, eod_id=data.dataset.eod_id, reset_positions=reset)


class StepFlops:
    """Training FLOPs of a step's global batch, for MFU: matmuls for every token, and attention for the
    (query, key) pairs its documents allow — causal over each whole row where there are no document masks.
    `per_token` is the causal count per token (what run_info.json records)."""

    def __init__(self, cfg: TrainConfig, data: Data) -> None:
        d = cfg.data
        self.per_token = train_flops_per_token(cfg.model, d.seq_len)
        self.per_pair = attention_flops_per_pair(cfg.model)
        self.tokens, self.causal_pairs = d.batch_size * d.seq_len, d.batch_size * d.seq_len * d.seq_len / 2
        self.data, self.documents = data, document_finder(cfg, data)

    def __call__(self, step: int) -> float:
        if self.documents is None:
            return self.per_token * self.tokens
        docs = self.documents(self.data.sampler.global_batch(step)[:, :-1])
        pairs = self.causal_pairs if docs.single else docs.pairs
        return self.per_token * self.tokens + self.per_pair * (pairs - self.causal_pairs)


@dataclass
class Stages:
    """This rank's model, the executor over its stages, and what the gradient reduction and memory estimate
    need to know about them."""

    model: Transformer
    executor: PipelineExecutor
    ties: list  # (group, names) of parameters copied on several pipeline ranks
    owned: set[str]  # names this rank counts in the clipping norm
    mem_stages: list[tuple[list[int], bool]]  # (layer ids incl. MTP blocks, holds the head) per stage
    in_flight: int  # micro-batches whose activations a stage keeps at once
    pipelined: bool  # several stages, or F&B pairs: losses and loads are summed over every rank
    # entries each optimizer step's record gets (the trainer's `after_step` hooks): the FP8 share under fp8
    after_step: list[Callable[[int, Any, Any], dict[str, Any]]] = field(default_factory=list)


def build_stages(cfg: TrainConfig, mesh: Mesh, counters: CommCounters, data: Data) -> Stages:
    p, t = cfg.parallel, cfg.trainer
    schedule = schedule_for(p)
    experts = expert_slice(cfg.model.n_routed_experts, mesh)
    balance = balance_loss_spec(cfg.balance)
    model, stages, chunks = rank_model_and_stages(
        cfg.model, schedule, mesh.pp_rank, balance, mesh.device, t.seed, experts, p.stage_layers
    )
    set_recompute(model, t.recompute)
    after_step: list[Callable[[int, Any, Any], dict[str, Any]]] = []
    resolved = precision(t.dtype, mesh.device)
    if resolved == "fp8":
        share = convert_to_fp8(model, cfg.model).share
        how = (
            "torch._scaled_mm"
            if scaled_mm_available(torch.empty(0, device=mesh.device))
            else "emulated in fp32"
        )
        print(f"rank {mesh.rank}: FP8 ({how}) runs {share:.0%} of its GEMMs", flush=True)
        after_step.append(lambda step, loads, keep: {"fp8_gemm_share": share})
    if compile_mode(t.compile, mesh.device, fp8=resolved == "fp8") == "phases":
        compile_phases(model)
    model.row_losses = cfg.data.name == "mixture"  # for Data.source_losses
    apply_expert_parallel(
        model,
        mesh,
        counters,
        dispatcher=p.dispatcher,
        fp8_rows=resolved == "fp8",
        bound=p.dispatch_bound,
        transport=p.dispatch_transport,
    )
    if cfg.model.init_from:
        from ..hf import load_hf_weights

        load_hf_weights(model, cfg.model.init_from)
    mtp_ids = [cfg.model.num_hidden_layers + d for d in range(len(model.mtp))]
    mem_stages = [(list(v.layer_ids) + (mtp_ids if v.is_last else []), v.is_last) for v in stages.values()]
    ties, owned = build_ties(model, mesh, schedule, chunks)
    lay = mesh.layout
    peers = [lay.rank_of(q, mesh.edp_rank, mesh.ep_rank) for q in range(lay.pp)]
    # the SM carveout steers CUDA matmuls only; set anywhere else it just prints torch's warning
    carveout = p.overlap_sm_carveout if mesh.device.type == "cuda" else 0
    executor = PipelineExecutor(
        schedule,
        mesh.pp_rank,
        stages,
        peers,
        None,
        cfg.model.hidden_size,
        # the residual stream between stages keeps the parameters' dtype, also under autocast (the engine
        # casts them to bf16 later under bf16_master)
        param_dtype(resolved) or next(model.parameters()).dtype,
        overlap=OverlapEngine(sm_carveout=carveout) if p.overlap else False,
    )
    executor.documents = document_finder(cfg, data) or executor.documents
    # the executor keeps a stage's graph until its W pass, so activations count until W
    in_flight = peak_activations(schedule, release="W")[mesh.pp_rank]
    pipelined = schedule.n_stages > 1 or p.overlap
    return Stages(model, executor, ties, owned, mem_stages, in_flight, pipelined, after_step)


def graph_blocker(cfg: TrainConfig, mesh: Mesh, executor: PipelineExecutor) -> str | None:
    """Why this run's micro-batches cannot replay from CUDA graphs (parallel/pipeline/graphed.py), or None."""
    resolved = precision(cfg.trainer.dtype, mesh.device)
    if mesh.device.type != "cuda":
        return "it needs a CUDA device"
    if mesh.world > 1:
        return f"it runs in one process, and this run has {mesh.world}"
    if not one_stage_order(executor.schedule, executor.rank):
        return "it needs one pipeline stage whose schedule runs each backward right after its forward"
    if cfg.parallel.overlap:
        return "parallel.overlap=true cuts every step at its all-to-alls"
    if cfg.optim.engine != "torch":
        return f"optim.engine={cfg.optim.engine} runs its own backward"
    if resolved == "fp8" and not fp8_experts_on_device(mesh.device):
        return "trainer.dtype=fp8 reads each MoE layer's row counts on the host without its Triton kernels"
    return None


def use_graphs(executor: PipelineExecutor, engine: Any, capture: bool = True) -> None:
    """Run each micro-batch from a CUDA graph (`capture=False`: the same static buffers without one, the
    CPU twin the tests use); the engine then zeroes gradients in place, where the graphs accumulate."""
    executor.graphed = GraphedMicroBatch(executor, capture)
    engine.keep_grads = True


def graphed_steps(
    cfg: TrainConfig,
    mesh: Mesh,
    executor: PipelineExecutor,
    engine: Any,
    with_graphs: Callable[[], MemoryEstimate] | None = None,
) -> bool:
    """Apply `trainer.cuda_graph` (None: wherever `graph_blocker` finds nothing and, on a CUDA device,
    evaluation still fits by the memory estimate with graphs, `with_graphs()`: graphs keep a micro-batch's
    activations allocated through evaluation, and change nothing else of the estimate); whether graphs
    run."""
    want = cfg.trainer.cuda_graph
    if want is False:
        return False
    why = graph_blocker(cfg, mesh, executor)
    if why is None and want is None and with_graphs is not None and mesh.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(mesh.device).total_memory
        if with_graphs().eval_total_bytes > capacity:
            print(
                f"rank {mesh.rank}: trainer.cuda_graph=null: micro-batches run eagerly, since with graphs "
                "evaluation's memory estimate exceeds the device (trainer.cuda_graph=true forces them)",
                flush=True,
            )
            return False
    if why is not None:
        if want:
            raise ConfigError(
                f"trainer.cuda_graph=true is not possible here: {why}; use null (graphs where a step "
                "qualifies) or false"
            )
        return False
    use_graphs(executor, engine)
    return True


def estimate_stage_memory(
    cfg: TrainConfig,
    mesh: Mesh,
    stages: Stages,
    amp: torch.dtype | None,
    engine: Any,
    graphs: bool | None = None,
) -> MemoryEstimate:
    """This rank's memory estimate: its stages' weights, the engine's optimizer-state layout, the
    activations of the micro-batches its schedule keeps in flight, and evaluation's one micro-batch.
    graphs: whether micro-batches replay from CUDA graphs (None: whether the executor's do)."""
    rows = cfg.data.batch_size // (mesh.layout.dp * cfg.parallel.microbatches)
    tokens, m, p = rows * cfg.data.seq_len, cfg.model, cfg.parallel
    dispatch, fp8 = None, precision(cfg.trainer.dtype, mesh.device) == "fp8"
    if p.dispatcher in BOUNDED and mesh.layout.ep > 1:  # fixed-size buffers, whatever the routing
        a = 2 if amp == torch.bfloat16 else 4
        k, per_rank, ep = m.num_experts_per_tok, m.n_routed_experts // mesh.layout.ep, mesh.layout.ep
        if p.dispatcher == "direct":
            dispatch = direct_memory(
                tokens, m.hidden_size, k, per_rank, ep, p.dispatch_bound, a, p.dispatch_transport
            )
        else:
            nodes, local = mesh.layout.ep_node_shape() if p.dispatcher != "bounded" else (1, ep)
            arriving = nodes * tokens  # the intra-node stage forwards what stage 1 brought from every node
            moved = p.dispatch_transport if local > 1 else "alltoall"  # a one-rank group moves no blocks
            dispatch = bounded_memory(
                tokens, m.hidden_size, k, per_rank, local, p.dispatch_bound, a, arriving, moved, fp8
            )
    return estimate_memory(
        stages.model,
        m,
        stages.mem_stages,
        tokens,
        stages.in_flight,
        cfg.trainer.recompute,
        amp == torch.bfloat16,
        engine.state_sharding(),
        fp8=fp8,
        graphs=stages.executor.graphed is not None if graphs is None else graphs,
        dispatch=dispatch,
    )


def report_memory(memory: MemoryEstimate, mesh: Mesh) -> None:
    """Print this rank's estimate, and warn before any step runs when a phase would not fit the device."""
    print(memory.line(mesh.rank), flush=True)
    d = mesh.device
    capacity = torch.cuda.get_device_properties(d).total_memory if d.type == "cuda" else None
    for line in memory.warnings(capacity):
        print(f"rank {mesh.rank}: {line}", file=sys.stderr, flush=True)


def moe_layer_ids(cfg: TrainConfig) -> list[int]:
    m = cfg.model
    return [i for i in range(m.num_hidden_layers + m.num_nextn_predict_layers) if is_moe_layer(m, i)]


def write_run_info(run_dir: str, cfg: TrainConfig, mesh: Mesh, **facts: Any) -> None:
    """run_info.json: data, sizes, layout, precision, the memory estimate (`facts`: data, params, flops,
    amp, memory, cuda_graph)."""
    lay, params, amp = mesh.layout, facts["params"], facts["amp"]
    resolved = precision(cfg.trainer.dtype, mesh.device)
    info = {
        "data": facts["data"],
        "params_total": params.total,
        "params_active": params.active,
        "params_mtp": params.mtp_total,
        "train_flops_per_token": facts["flops"],
        "device": str(mesh.device),
        "world_size": mesh.world,
        "layout": {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep},
        "autocast": str(amp) if amp else "fp32",
        "dtype": resolved,  # `auto` resolved
        "recompute": cfg.trainer.recompute,
        "compile": compile_mode(cfg.trainer.compile, mesh.device, fp8=resolved == "fp8"),  # resolved
        "cuda_graph": facts["cuda_graph"],
        "memory_estimate_rank0": facts["memory"].as_dict(),
    }
    with open(os.path.join(run_dir, "run_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, default=str)
