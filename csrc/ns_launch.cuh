// Kernel launchers shared by the driver (ns_driver.cu) and the per-arch translation units.
#pragma once
#include <cuda_runtime.h>

#include "ns_device.cuh"

namespace muon {

struct Operand {
    const u16* p;
    i64 bs, ld;  // batch stride and row stride, elements; column stride 1
};

void launch_normalize(const NormParams& p, int in_dtype, i64 batch, cudaStream_t stream);
void launch_syrk_sm80(Operand S, int M, int K, const Epilogue& e, i64 batch, cudaStream_t stream);
void launch_gemm_sm80(Operand A, Operand X, int M, int N, const Epilogue& e, i64 batch, cudaStream_t stream);
cudaError_t probe_sm80();

// Built only when MUON_CUDA_ARCHS has 90a (ns_sm90.cu). Operands must be 16-B aligned with ld a
// multiple of 8 (TMA's rules); the driver's workspace is.
void launch_syrk_sm90(Operand S, int M, int K, const Epilogue& e, i64 batch, cudaStream_t stream);
void launch_gemm_sm90(Operand A, Operand X, int M, int N, const Epilogue& e, i64 batch, cudaStream_t stream);
cudaError_t probe_sm90();

void check_launch(const char* what);  // throws std::runtime_error with the CUDA error of the last launch

}  // namespace muon
