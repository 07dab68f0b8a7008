// Index math shared by the host and the device: triangle tile scheduling, accumulator fragment
// coordinates and shared-memory swizzles. Plain C++ (no CUDA headers) so that the pybind11 module
// exposes exactly these functions to the CPU unit tests (tests/test_cuda_index.py), and so that NVRTC
// (the CuPy path) compiles them without any system header.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define MUON_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define MUON_HD inline
#endif

namespace muon {

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

MUON_HD i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
MUON_HD i64 round_up(i64 a, i64 b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------------------------
// Symmetric products (X·Xᵀ and A·Aᵀ) compute only the tiles (i, j) with j <= i of a t×t tile grid
// and store each off-diagonal tile twice (itself and its mirror). tile_count(t) = t(t+1)/2 blocks
// are launched; block b takes the b-th tile of the lower triangle in row-major order, so
// consecutive blocks share the row panel i (its loads stay hot in L2).
// ---------------------------------------------------------------------------------------------
MUON_HD i64 tri_tile_count(i64 t) { return t * (t + 1) / 2; }

MUON_HD void tri_tile_coords(i64 b, i64* i, i64* j) {
    // i = floor((sqrt(8b + 1) - 1) / 2); the double estimate is exact to ±1 for every b < 2^52,
    // the two loops fix that rounding.
    i64 r = (i64)((sqrt(8.0 * (double)b + 1.0) - 1.0) * 0.5);
    while (r > 0 && r * (r + 1) / 2 > b) --r;
    while ((r + 1) * (r + 2) / 2 <= b) ++r;
    *i = r;
    *j = b - r * (r + 1) / 2;
}

// ---------------------------------------------------------------------------------------------
// Accumulator fragments. mma.sync m16n8 (sm80) and each 8-column slice of wgmma m64nN (sm90) hold
// the fp32 accumulator in the same pattern: lane l owns rows l/4 and l/4 + 8 and columns
// 2(l%4), 2(l%4)+1. For wgmma, warp w of the warpgroup owns rows 16w..16w+15 and register r sits in
// column block r/4.
// ---------------------------------------------------------------------------------------------
MUON_HD void mma_acc_coord(int lane, int r, int* row, int* col) {
    *row = lane / 4 + 8 * (r / 2);
    *col = 2 * (lane % 4) + (r % 2);
}

MUON_HD void wgmma_acc_coord(int thread, int r, int* row, int* col) {
    int warp = thread / 32, lane = thread % 32;
    *row = 16 * warp + lane / 4 + 8 * ((r >> 1) & 1);
    *col = 8 * (r >> 2) + 2 * (lane % 4) + (r & 1);
}

// ---------------------------------------------------------------------------------------------
// sm80 shared-memory tiles, in bf16 elements. A K-major tile is rows × 32 (64 B a row, four 16-B
// chunks); ldmatrix reads 8 rows at one logical chunk per phase, so the physical chunk is XORed
// with (row/2)%4: two rows share a 128-B bank window and the 8 rows land on 8 distinct 16-B slots
// (conflict-free). An MN-major tile is 32 × 128 (256 B a row, sixteen chunks); ldmatrix.trans
// reads 8 consecutive k rows at one chunk, XOR with k%8 spreads them over the 8 slots.
// ---------------------------------------------------------------------------------------------
constexpr int SM80_BK = 32;
constexpr int SM80_BN = 128;

MUON_HD int sm80_kmajor_offset(int row, int k) {
    int chunk = (k / 8) ^ ((row >> 1) & 3);
    return row * SM80_BK + chunk * 8 + (k % 8);
}

MUON_HD int sm80_mnmajor_offset(int k, int n) {
    int chunk = (n / 8) ^ (k & 7);
    return k * SM80_BN + chunk * 8 + (n % 8);
}

// Bank window of a 16-B chunk at element offset `off` (8 windows of 16 B in the 128-B bank line):
// ldmatrix is conflict-free when the 8 addresses of a phase fall in 8 distinct windows.
MUON_HD int bank_slot(int off) { return ((off * 2) % 128) / 16; }

}  // namespace muon
