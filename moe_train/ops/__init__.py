"""Kernels with their CPU twins: row gathers and bag sums (`gather`, Triton on CUDA), the experts' grouped
GEMM (`grouped_gemm`), the memory-bound elementwise ops fused on CUDA (`fused`: RMSNorm, SwiGLU, RoPE),
document-masked attention (`attention`), the head's cross-entropy without whole fp32 logits
(`cross_entropy`), the FP8 recipe's quantisation math (`fp8`, the reference its kernels are held to) and its
experts (`fp8_experts`, with grouped Triton GEMMs in `fp8_grouped_triton`). Each
GPU path is tested against the CPU path's semantics. Nothing here knows the model or parallelism."""
