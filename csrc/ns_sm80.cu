// Launchers for the normalization kernels (every arch) and the mma.sync GEMMs (sm_80 and newer).
#include <stdexcept>
#include <string>

#include "ns_launch.cuh"
#include "ns_sm80.cuh"

namespace muon {

void check_launch(const char* what) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

template <typename T>
static void normalize_typed(const NormParams& p, i64 batch, cudaStream_t stream) {
    const unsigned grid = (unsigned)(batch * p.parts);
    norm_amax_kernel<T><<<grid, NORM_THREADS, 0, stream>>>(p);
    norm_sumsq_kernel<T><<<grid, NORM_THREADS, 0, stream>>>(p);
    norm_apply_kernel<T><<<grid, NORM_THREADS, 0, stream>>>(p);
}

void launch_normalize(const NormParams& p, int in_dtype, i64 batch, cudaStream_t stream) {
    switch (in_dtype) {
        case kFloat32: normalize_typed<float>(p, batch, stream); break;
        case kBFloat16: normalize_typed<u16>(p, batch, stream); break;
        case kFloat16: normalize_typed<Half>(p, batch, stream); break;
        case kFloat64: normalize_typed<double>(p, batch, stream); break;
        default: throw std::invalid_argument("in_dtype must be 0 (fp32), 1 (bf16), 2 (fp16) or 3 (fp64)");
    }
    check_launch("normalization kernels");
}

void launch_syrk_sm80(Operand S, int M, int K, const Epilogue& e, i64 batch, cudaStream_t stream) {
    sm80::SyrkParams p{S.p, S.bs, S.ld, M, K, tri_tile_count(ceil_div(M, sm80::BM)), e};
    cudaFuncSetAttribute(sm80::syrk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm80::SMEM_BYTES);
    sm80::syrk_kernel<<<(unsigned)(batch * p.tiles), sm80::THREADS, sm80::SMEM_BYTES, stream>>>(p);
    check_launch("sm80 Gram kernel");
}

void launch_gemm_sm80(Operand A, Operand X, int M, int N, const Epilogue& e, i64 batch, cudaStream_t stream) {
    const i64 tn = ceil_div(N, sm80::BN);
    sm80::GemmParams p{A.p, A.bs, A.ld, X.p, X.bs, X.ld, M, N, tn, tn * ceil_div(M, sm80::BM), e};
    cudaFuncSetAttribute(sm80::gemm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sm80::SMEM_BYTES);
    sm80::gemm_kernel<<<(unsigned)(batch * p.tiles), sm80::THREADS, sm80::SMEM_BYTES, stream>>>(p);
    check_launch("sm80 B·X kernel");
}

cudaError_t probe_sm80() {
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, sm80::syrk_kernel);
    if (err != cudaSuccess) cudaGetLastError();  // not sticky: clear it
    return err;
}

}  // namespace muon
