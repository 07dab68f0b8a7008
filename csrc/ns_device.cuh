// Device code shared by every arch: bf16 conversions, the scale-safe normalization kernels and the
// fused GEMM epilogue. No system headers: the CuPy path compiles this file with NVRTC unchanged.
#pragma once
#include "ns_index.h"

namespace muon {

// Input dtypes the driver reads (the output and all intermediates are bf16).
enum DType { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 float_to_bf16(float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    // cvt packs its first source into the upper half.
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <typename T> struct Load;
template <> struct Load<float> { __device__ static float get(const float* p) { return *p; } };
template <> struct Load<double> { __device__ static double get(const double* p) { return *p; } };
template <> struct Load<u16> { __device__ static float get(const u16* p) { return bf16_to_float(*p); } };
struct Half { u16 bits; };
template <> struct Load<Half> {
    __device__ static float get(const Half* p) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
        return f;
    }
};
// Work precision of the normalization: fp64 for fp64 inputs, fp32 otherwise (as muon/backends/torch_backend.py normalize).
template <typename T> struct Work { typedef float type; };
template <> struct Work<double> { typedef double type; };

// ---------------------------------------------------------------------------------------------
// Normalization X0 = (X / amax) / (fro_scale * ||X / amax||_F + eps), per matrix, in three passes
// with per-block partials and no atomics (1-D grid: batch × parts): every block reduces the partials in the same order, so
// the result is deterministic and no workspace needs zeroing (no memset in the graph).
//   1. partial max|x| per block;  2. partial sum((x / amax)^2);  3. scale and store bf16.
// Dividing by the max first keeps the squares inside the fp32 range for any input scale.
// ---------------------------------------------------------------------------------------------
constexpr int NORM_THREADS = 256;

struct NormParams {
    const void* in;
    i64 in_bs, in_rs, in_cs;  // element strides
    u16* out;
    i64 out_bs, out_rs, out_cs;
    i64 m, n;
    int parts;  // blocks per matrix
    double* part_amax;  // [batch][parts]
    double* part_ss;    // [batch][parts]
    float fro_scale, eps;
};

template <typename W>
__device__ __forceinline__ W nan_max(W a, W b) { return (b > a || b != b) ? b : a; }

template <typename W, bool MAX>
__device__ W block_reduce(W v, W* scratch) {
    for (int off = 16; off > 0; off >>= 1) {
        W o = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? nan_max(v, o) : v + o;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    W r = scratch[0];
    for (int w = 1; w < NORM_THREADS / 32; ++w) r = MAX ? nan_max(r, scratch[w]) : r + scratch[w];
    return r;
}

template <typename W>
__device__ W reduce_parts(const double* parts, int count, bool is_max) {
    W r = (W)parts[0];
    for (int k = 1; k < count; ++k) r = is_max ? nan_max(r, (W)parts[k]) : r + (W)parts[k];
    return r;
}

template <typename W>
__device__ __forceinline__ W safe_amax(W amax) { return amax > (W)0 ? amax : (W)1; }

template <typename T>
__device__ __forceinline__ void norm_amax_body(const NormParams& p) {
    typedef typename Work<T>::type W;
    __shared__ W scratch[NORM_THREADS / 32];
    const i64 b = blockIdx.x / p.parts, part = blockIdx.x % p.parts, total = p.m * p.n;
    const T* in = (const T*)p.in + b * p.in_bs;
    W v = (W)0;
    for (i64 idx = part * NORM_THREADS + threadIdx.x; idx < total; idx += (i64)p.parts * NORM_THREADS) {
        i64 i = idx / p.n, j = idx - i * p.n;
        W x = (W)Load<T>::get(in + i * p.in_rs + j * p.in_cs);
        v = nan_max(v, x < (W)0 ? -x : x);
    }
    v = block_reduce<W, true>(v, scratch);
    if (threadIdx.x == 0) p.part_amax[b * p.parts + part] = (double)v;
}

template <typename T>
__device__ __forceinline__ void norm_sumsq_body(const NormParams& p) {
    typedef typename Work<T>::type W;
    __shared__ W scratch[NORM_THREADS / 32];
    const i64 b = blockIdx.x / p.parts, part = blockIdx.x % p.parts, total = p.m * p.n;
    const T* in = (const T*)p.in + b * p.in_bs;
    const W amax = safe_amax(reduce_parts<W>(p.part_amax + b * p.parts, p.parts, true));
    W v = (W)0;
    for (i64 idx = part * NORM_THREADS + threadIdx.x; idx < total; idx += (i64)p.parts * NORM_THREADS) {
        i64 i = idx / p.n, j = idx - i * p.n;
        W x = (W)Load<T>::get(in + i * p.in_rs + j * p.in_cs) / amax;
        v += x * x;
    }
    v = block_reduce<W, false>(v, scratch);
    if (threadIdx.x == 0) p.part_ss[b * p.parts + part] = (double)v;
}

template <typename T>
__device__ __forceinline__ void norm_apply_body(const NormParams& p) {
    typedef typename Work<T>::type W;
    const i64 b = blockIdx.x / p.parts, part = blockIdx.x % p.parts, total = p.m * p.n;
    const T* in = (const T*)p.in + b * p.in_bs;
    u16* out = p.out + b * p.out_bs;
    const W amax = safe_amax(reduce_parts<W>(p.part_amax + b * p.parts, p.parts, true));
    const W norm = sqrt(reduce_parts<W>(p.part_ss + b * p.parts, p.parts, false));
    // torch_backend.normalize: (norm * fro_scale + eps).clamp_min(finfo.tiny): a zero matrix stays zero.
    const W tiny = sizeof(W) == 8 ? (W)2.2250738585072014e-308 : (W)1.1754943508222875e-38;
    W denom = norm * (W)p.fro_scale + (W)p.eps;
    denom = denom > tiny ? denom : (denom != denom ? denom : tiny);
    for (i64 idx = part * NORM_THREADS + threadIdx.x; idx < total; idx += (i64)p.parts * NORM_THREADS) {
        i64 i = idx / p.n, j = idx - i * p.n;
        W x = (W)Load<T>::get(in + i * p.in_rs + j * p.in_cs) / amax / denom;
        out[i * p.out_rs + j * p.out_cs] = float_to_bf16((float)x);
    }
}

template <typename T>
__global__ void __launch_bounds__(NORM_THREADS) norm_amax_kernel(NormParams p) { norm_amax_body<T>(p); }
template <typename T>
__global__ void __launch_bounds__(NORM_THREADS) norm_sumsq_kernel(NormParams p) { norm_sumsq_body<T>(p); }
template <typename T>
__global__ void __launch_bounds__(NORM_THREADS) norm_apply_kernel(NormParams p) { norm_apply_body<T>(p); }

// ---------------------------------------------------------------------------------------------
// GEMM epilogues. Every NS GEMM ends in out = alpha * acc + beta * C with C an input of the same
// shape (the Gram A for B = b·A + c·A·A, X itself for X' = a·X + B·X), stored as bf16 (as torch's
// bf16 GEMMs round their outputs).
// ---------------------------------------------------------------------------------------------
struct Epilogue {
    const u16* cin;  // beta operand (null: beta = 0)
    i64 cin_bs, cin_ld;
    u16* out;
    i64 out_bs, out_rs, out_cs;
    float alpha, beta;
};

// Stores go through a shared-memory tile of alpha·acc in fp32 (row stride BN + 1 floats: the row
// pass and the column pass both read it without bank conflicts), so that both the tile and its
// mirror are written row by row, coalesced. Symmetric outputs take only the elements on or below
// the diagonal from the accumulators and mirror them: the stored matrix is then exactly symmetric
// (a diagonal tile's accumulator need not be, bit for bit), which the next product relies on when
// it reads Cin transposed.
template <int BN>
struct StagedTile {
    static constexpr int LD = BN + 1;
    __device__ __forceinline__ static void put(float* tile, int r, int c, float v0, float v1) {
        tile[r * LD + c] = v0;
        tile[r * LD + c + 1] = v1;
    }
};

template <int BM, int BN>
__device__ __forceinline__ void store_staged(const float* tile, const Epilogue& e, i64 b, int m0, int n0, int rows,
                                             int cols, bool symmetric, int tid, int nthreads) {
    constexpr int LD = BN + 1;
    const bool diag = symmetric && m0 == n0;
    u16* out = e.out + b * e.out_bs;
    const u16* cin = e.cin != nullptr ? e.cin + b * e.cin_bs : nullptr;
    // Row pass: tile element (r, c) to (m0 + r, n0 + c).
    for (int idx = tid; idx < BM * BN; idx += nthreads) {
        const int r = idx / BN, c = idx % BN, row = m0 + r, col = n0 + c;
        if (row >= rows || col >= cols || (diag && c > r)) continue;
        float v = tile[r * LD + c];
        if (cin != nullptr) v += e.beta * bf16_to_float(cin[(i64)row * e.cin_ld + col]);
        out[(i64)row * e.out_rs + (i64)col * e.out_cs] = float_to_bf16(v);
    }
    if (!symmetric) return;
    // Column pass: the mirror, (r, c) to (n0 + c, m0 + r), consecutive threads along r. Cin is
    // symmetric bit for bit, so its mirrored element is read coalesced from the mirrored position.
    for (int idx = tid; idx < BM * BN; idx += nthreads) {
        const int c = idx / BM, r = idx % BM, row = m0 + r, col = n0 + c;
        if (row >= rows || col >= cols || (diag && c >= r)) continue;
        float v = tile[r * LD + c];
        if (cin != nullptr) v += e.beta * bf16_to_float(cin[(i64)col * e.cin_ld + row]);
        out[(i64)col * e.out_rs + (i64)row * e.out_cs] = float_to_bf16(v);
    }
}

}  // namespace muon
