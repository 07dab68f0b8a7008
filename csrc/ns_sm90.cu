// Launchers for the Hopper wgmma/TMA kernels. This file is compiled for sm_90a only (CMakeLists.txt):
// on any other GPU its kernels have no image, which probe_sm90() reports instead of running.
#include <cuda.h>

#include <mutex>
#include <stdexcept>
#include <string>

#include "ns_launch.cuh"
#include "ns_sm90.cuh"

namespace muon {

namespace {

// B·X uses 128×256 tiles (two consumer warpgroups × m64n256: 128 fp32 accumulators a thread, the
// largest tile that fits the register file without spills at 384 threads).
constexpr int GEMM_BN = 256;
constexpr int SYRK_BN = sm90::BM;

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled is a driver API: fetch it through the runtime so the module does not link
// libcuda (it must import on machines without a driver).
EncodeTiled encode_fn() {
    static EncodeTiled fn = nullptr;
    static std::once_flag once;
    std::call_once(once, [] {
        void* ptr = nullptr;
        cudaDriverEntryPointQueryResult status;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) ==
                cudaSuccess &&
            status == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<EncodeTiled>(ptr);
        cudaGetLastError();
    });
    if (!fn) throw std::runtime_error("the CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12+ driver)");
    return fn;
}

// A 3-D map (columns, rows, batch) over a bf16 stack with unit column stride, 128-B swizzled boxes
// of 64 columns × box_rows rows; reads past the edges return zeros.
CUtensorMap make_map(const u16* base, i64 cols, i64 rows, i64 batch, i64 ld, i64 bs, int box_rows) {
    CUtensorMap map;
    const cuuint64_t dims[3] = {(cuuint64_t)cols, (cuuint64_t)rows, (cuuint64_t)batch};
    const cuuint64_t strides[2] = {(cuuint64_t)ld * 2, (cuuint64_t)(batch > 1 ? bs : rows * ld) * 2};
    const cuuint32_t box[3] = {64, (cuuint32_t)box_rows, 1};
    const cuuint32_t elem[3] = {1, 1, 1};
    CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void*)base, dims, strides, box, elem,
                             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        throw std::runtime_error("cuTensorMapEncodeTiled failed (error " + std::to_string((int)r) +
                                 "): operands need 16-B aligned rows (ld a multiple of 8)");
    return map;
}

template <int BN, bool B_MN, bool SYM>
void launch(const CUtensorMap& a, const CUtensorMap& b, const sm90::Params& p, i64 batch, cudaStream_t stream) {
    auto kernel = sm90::wgmma_kernel<BN, B_MN, SYM>;
    constexpr int smem = sm90::smem_bytes<BN>();
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    kernel<<<(unsigned)(batch * p.tiles), sm90::THREADS, smem, stream>>>(a, b, p);
}

}  // namespace

void launch_syrk_sm90(Operand S, int M, int K, const Epilogue& e, i64 batch, cudaStream_t stream) {
    const CUtensorMap map = make_map(S.p, K, M, batch, S.ld, S.bs, sm90::BM);
    sm90::Params p;
    p.M = M;
    p.N = M;
    p.K = K;
    p.tiles_m = p.tiles_n = ceil_div(M, sm90::BM);
    p.tiles = tri_tile_count(p.tiles_m);
    p.e = e;
    launch<SYRK_BN, false, true>(map, map, p, batch, stream);  // both operands are rows of S
    check_launch("sm90 Gram kernel");
}

void launch_gemm_sm90(Operand A, Operand X, int M, int N, const Epilogue& e, i64 batch, cudaStream_t stream) {
    const CUtensorMap ma = make_map(A.p, M, M, batch, A.ld, A.bs, sm90::BM);
    const CUtensorMap mx = make_map(X.p, N, M, batch, X.ld, X.bs, 64);  // k rows × 64 columns boxes
    sm90::Params p;
    p.M = M;
    p.N = N;
    p.K = M;
    p.tiles_m = ceil_div(M, sm90::BM);
    p.tiles_n = ceil_div(N, GEMM_BN);
    p.tiles = p.tiles_m * p.tiles_n;
    p.e = e;
    launch<GEMM_BN, true, false>(ma, mx, p, batch, stream);
    check_launch("sm90 B·X kernel");
}

cudaError_t probe_sm90() {
    cudaFuncAttributes attr;
    cudaError_t err = cudaFuncGetAttributes(&attr, sm90::wgmma_kernel<SYRK_BN, false, true>);
    if (err != cudaSuccess) cudaGetLastError();
    return err;
}

}  // namespace muon
