"""DeepGEMM's grouped FP8 GEMMs on a CPU: the two calls ops/fp8_experts.py makes, in plain torch, checking
the operands' shapes and layouts as the SM90 kernels take them, and a fixture that routes the FP8 experts
through them. So the tests hold the layouts around the kernels (row groups, the transposed weight's blocks,
Wgrad's per-group blocks) to the per-expert loop; the kernels themselves are checked on a GPU."""

from __future__ import annotations

import pytest
import torch

from moe_train.ops.fp8 import TILE, blockwise_mm

E4M3 = torch.float8_e4m3fn


class DeepGEMMTwin:
    """`deep_gemm`'s calls as ops/fp8_experts.py uses them; `calls` counts them by name."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @staticmethod
    def get_mk_alignment_for_contiguous_layout() -> int:
        return TILE

    def m_grouped_fp8_gemm_nt_contiguous(self, a, b, d, grouped_layout, disable_ue8m0_cast=False) -> None:  # noqa: ANN001
        """d[rows of group g] = a[those rows] @ b[g].T: a [M, K] E4M3 with 1×128 tile scales [M, K/128], b
        [G, N, K] E4M3 with 128×128 block scales [G, N/128, K/128], each row's group in `grouped_layout`
        (int32 [M]), whole 128-row blocks per group."""
        self._count("m_grouped")
        (qa, sa), (qb, sb) = a, b
        m, k = qa.shape
        g, n, _ = qb.shape
        assert disable_ue8m0_cast and qa.dtype == qb.dtype == E4M3 and d.dtype == torch.bfloat16
        assert qb.shape == (g, n, k) and d.shape == (m, n) and qa.is_contiguous() and qb.is_contiguous()
        assert sa.shape == (m, k // TILE) and sb.shape == (g, n // TILE, k // TILE)
        assert grouped_layout.dtype == torch.int32 and grouped_layout.shape == (m,)
        ids = grouped_layout.tolist()
        assert all(len(set(ids[r : r + TILE])) == 1 for r in range(0, m, TILE)), "a row block spans groups"
        for e in range(g):
            rows = [r for r, i in enumerate(ids) if i == e]
            if rows:
                r0, r1 = rows[0], rows[-1] + 1
                assert r1 - r0 == len(rows), "a group's rows are not contiguous"
                d[r0:r1] = blockwise_mm(qa[r0:r1].float(), sa[r0:r1], qb[e].float(), sb[e]).to(d.dtype)

    def k_grouped_fp8_gemm_nt_contiguous(self, a, b, d, ks_cpu, grouped_layout, c=None) -> None:  # noqa: ANN001
        """d[g] = c[g] + A_g @ B_g.T over group g's ks_cpu[g] tokens: A_g [M, k_g] and B_g [N, k_g] E4M3,
        K-major blocks stored one after another (flat), tiled by 128 along the tokens with scales [M, ΣK/128]
        and [N, ΣK/128]; d, c fp32 [G, M, N]."""
        self._count("k_grouped")
        (qa, sa), (qb, sb) = a, b
        g, m, n = d.shape
        total = sum(ks_cpu)
        assert c is not None and c.shape == d.shape and d.dtype == c.dtype == torch.float32
        assert grouped_layout.tolist() == list(ks_cpu) and len(ks_cpu) == g
        assert all(k % TILE == 0 for k in ks_cpu) and qa.dtype == qb.dtype == E4M3
        assert qa.numel() == total * m and qb.numel() == total * n
        assert sa.shape == (m, total // TILE) and sb.shape == (n, total // TILE)
        pa = pb = col = 0
        for e, k in enumerate(ks_cpu):
            part = torch.zeros(m, n)
            if k:
                ta, tb = sa[:, col // TILE : (col + k) // TILE], sb[:, col // TILE : (col + k) // TILE]
                qa_e, qb_e = qa[pa : pa + m * k].view(m, k), qb[pb : pb + n * k].view(n, k)
                part = blockwise_mm(qa_e.float(), ta, qb_e.float(), tb)
            d[e] = c[e] + part
            pa, pb, col = pa + m * k, pb + n * k, col + k


@pytest.fixture
def deep_gemm_twin(monkeypatch):
    """The FP8 experts' DeepGEMM path switched on for CPU tensors, DeepGEMM replaced by `DeepGEMMTwin`."""
    from moe_train.ops import fp8_experts

    twin = DeepGEMMTwin()
    monkeypatch.setattr(fp8_experts, "_deep_gemm", lambda: twin)
    monkeypatch.setattr(fp8_experts, "deep_gemm_available", lambda x, *ks: True)
    return twin
