"""Kernels with their CPU twins: row gathers and bag sums (`gather`, Triton on CUDA), the experts' grouped
GEMM (`grouped_gemm`), activations (`swiglu`). Each GPU path is tested against the CPU path's semantics.
Nothing here knows the model or parallelism."""
