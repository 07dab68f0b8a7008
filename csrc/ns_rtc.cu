// Entry points of the CuPy path (muon/cupy_path.py): NVRTC compiles this file, which pulls in the
// same device sources the extension is built from (normalization, mma.sync GEMMs); these wrappers
// only flatten the parameter structs into scalar arguments for cupy.RawKernel. The wgmma/TMA
// kernels stay extension-only: their tensor maps are encoded by a driver call CuPy does not expose.
#include "ns_sm80.cuh"

using namespace muon;

#define MUON_NORM_ARGS                                                                                           \
    const void *in, i64 in_bs, i64 in_rs, i64 in_cs, u16 *out, i64 out_bs, i64 out_rs, i64 out_cs, i64 m, i64 n, \
        int parts, double *part_amax, double *part_ss, float fro_scale, float eps
#define MUON_NORM_PARAMS \
    NormParams { in, in_bs, in_rs, in_cs, out, out_bs, out_rs, out_cs, m, n, parts, part_amax, part_ss, fro_scale, eps }

#define MUON_NORM_ENTRY(NAME, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) muon_norm_amax_##NAME(MUON_NORM_ARGS) {            \
        norm_amax_body<T>(MUON_NORM_PARAMS);                                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) muon_norm_sumsq_##NAME(MUON_NORM_ARGS) {           \
        norm_sumsq_body<T>(MUON_NORM_PARAMS);                                                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) muon_norm_apply_##NAME(MUON_NORM_ARGS) {           \
        norm_apply_body<T>(MUON_NORM_PARAMS);                                                                    \
    }

MUON_NORM_ENTRY(float32, float)
MUON_NORM_ENTRY(bfloat16, u16)
MUON_NORM_ENTRY(float16, Half)
MUON_NORM_ENTRY(float64, double)

extern "C" __global__ void __launch_bounds__(sm80::THREADS)
    muon_syrk(const u16* s, i64 s_bs, i64 s_ld, int M, int K, i64 tiles, const u16* cin, i64 cin_bs, i64 cin_ld,
              u16* out, i64 out_bs, i64 out_rs, i64 out_cs, float alpha, float beta) {
    sm80::syrk_body(sm80::SyrkParams{s, s_bs, s_ld, M, K, tiles, Epilogue{cin, cin_bs, cin_ld, out, out_bs, out_rs,
                                                                          out_cs, alpha, beta}});
}

extern "C" __global__ void __launch_bounds__(sm80::THREADS)
    muon_gemm(const u16* a, i64 a_bs, i64 a_ld, const u16* x, i64 x_bs, i64 x_ld, int M, int N, i64 tiles_n,
              i64 tiles, const u16* cin, i64 cin_bs, i64 cin_ld, u16* out, i64 out_bs, i64 out_rs, i64 out_cs,
              float alpha, float beta) {
    sm80::gemm_body(sm80::GemmParams{a, a_bs, a_ld, x, x_bs, x_ld, M, N, tiles_n, tiles,
                                     Epilogue{cin, cin_bs, cin_ld, out, out_bs, out_rs, out_cs, alpha, beta}});
}
