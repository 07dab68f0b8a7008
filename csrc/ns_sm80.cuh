// The mma.sync (HMMA) path for sm_80 / sm_86 / sm_89 (and, JIT-compiled from PTX, newer GPUs).
//
// Why a hand-written mainloop and not CUTLASS/CuTe: the three NS GEMMs need a triangle tile
// scheduler with a mirrored store and an alpha·acc + beta·C epilogue, small changes to a ~150-line
// mainloop but a custom tile scheduler and epilogue visitor in CUTLASS; CuTe's headers also cost
// minutes of compile time per instantiation on CI's 2 cores, and they do not compile under NVRTC,
// which the CuPy path needs (this file has no includes beyond ours).
//
// Tile 128×128×32, 4 warps in 2×2 (64×64 each, 4×8 mma.m16n8k16 tiles, 128 fp32 accumulators a
// thread), 4-stage cp.async pipeline (fits sm_89's 99 KB). Operands are bf16, the
// accumulator fp32. Shared memory: 66 KB (the epilogue tile outgrows the 64-KB pipeline). Edges: cp.async zero-fills what lies past the matrix (src-size < 16), so any
// m and n work; leading dimensions must be multiples of 8 elements (the driver pads its workspace).
#pragma once
#include "ns_device.cuh"

namespace muon {
namespace sm80 {

constexpr int BM = 128, BN = SM80_BN, BK = SM80_BK, STAGES = 4, THREADS = 128;
constexpr int A_TILE = BM * BK, B_TILE = BN * BK;  // elements per stage
constexpr int PIPE_BYTES = STAGES * (A_TILE + B_TILE) * 2, EPI_BYTES = BM * (BN + 1) * 4;
constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copy a rows×32 K-major panel slice (rows valid_rows, k valid up to K) into a swizzled stage.
__device__ __forceinline__ void load_kmajor(u16* stage, const u16* src, i64 ld, int rows, int valid_rows, int k0,
                                            int K) {
    // rows × 4 chunks of 8 elements; THREADS threads each copy rows*4/THREADS chunks.
    for (int c = threadIdx.x; c < rows * 4; c += THREADS) {
        int row = c / 4, kc = c % 4, k = k0 + kc * 8;
        int bytes = (row < valid_rows) ? max(0, min(8, K - k)) * 2 : 0;
        const u16* g = bytes > 0 ? src + (i64)row * ld + k : src;
        cp_async16(smem_addr(stage + sm80_kmajor_offset(row, kc * 8)), g, bytes);
    }
}

// Copy a 32×128 MN-major slice (k rows from k0, columns valid up to valid_cols) of X.
__device__ __forceinline__ void load_mnmajor(u16* stage, const u16* src, i64 ld, int k0, int K, int valid_cols) {
    for (int c = threadIdx.x; c < BK * (BN / 8); c += THREADS) {
        int kr = c / (BN / 8), nc = c % (BN / 8), k = k0 + kr, n = nc * 8;
        int bytes = (k < K) ? max(0, min(8, valid_cols - n)) * 2 : 0;
        const u16* g = bytes > 0 ? src + (i64)k * ld + n : src;
        cp_async16(smem_addr(stage + sm80_mnmajor_offset(kr, n)), g, bytes);
    }
}

// The mainloop: acc (a 64×64 warp tile) += A[0:128, 0:K] · B, where A is a K-major panel and B is
// either a K-major panel of 128 rows (B_MN = false: acc = A·Bᵀ, the Gram products) or an MN-major
// K×128 slice (B_MN = true: acc = A·B, the B·X product).
template <bool B_MN>
__device__ __forceinline__ void mainloop(float (&acc)[4][8][4], u16* smem, const u16* a, i64 a_ld, int a_rows,
                                         const u16* bsrc, i64 b_ld, int b_valid, int K) {
    u16* sa = smem;
    u16* sb = smem + STAGES * A_TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * 64, wn = (warp % 2) * 64;
    const int KT = (int)ceil_div(K, BK);

    auto load_stage = [&](int stage, int kt) {
        load_kmajor(sa + stage * A_TILE, a, a_ld, BM, a_rows, kt * BK, K);
        if (B_MN)
            load_mnmajor(sb + stage * B_TILE, bsrc, b_ld, kt * BK, K, b_valid);
        else
            load_kmajor(sb + stage * B_TILE, bsrc, b_ld, BN, b_valid, kt * BK, K);
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt is visible; every warp is done with stage kt-1 (refilled next)
        if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();
        const u16* ta = sa + (kt % STAGES) * A_TILE;
        const u16* tb = sb + (kt % STAGES) * B_TILE;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            u32 af[4][4], bf[8][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                int row = wm + mi * 16 + (lane % 16), k = ks * 16 + (lane / 16) * 8;
                ldmatrix_x4(smem_addr(ta + sm80_kmajor_offset(row, k)), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
            }
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                int q = lane / 8;
                if (B_MN) {
                    int k = ks * 16 + (q % 2) * 8 + lane % 8, n = wn + p * 16 + (q / 2) * 8;
                    ldmatrix_x4_trans(smem_addr(tb + sm80_mnmajor_offset(k, n)), bf[2 * p][0], bf[2 * p][1],
                                      bf[2 * p + 1][0], bf[2 * p + 1][1]);
                } else {
                    int n = wn + p * 16 + (q / 2) * 8 + lane % 8, k = ks * 16 + (q % 2) * 8;
                    ldmatrix_x4(smem_addr(tb + sm80_kmajor_offset(n, k)), bf[2 * p][0], bf[2 * p][1],
                                bf[2 * p + 1][0], bf[2 * p + 1][1]);
                }
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int ni = 0; ni < 8; ++ni) mma_bf16(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
    cp_async_wait<0>();
}

// Accumulators (times alpha) into the staged fp32 tile, which reuses the pipeline's shared memory.
__device__ __forceinline__ void stage_acc(const float (&acc)[4][8][4], float* tile, float alpha) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * 64, wn = (warp % 2) * 64;
    __syncthreads();  // every warp is done reading the pipeline stages
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int r, c;
                mma_acc_coord(lane, 2 * h, &r, &c);
                StagedTile<BN>::put(tile, wm + mi * 16 + r, wn + ni * 8 + c, alpha * acc[mi][ni][2 * h],
                                    alpha * acc[mi][ni][2 * h + 1]);
            }
    __syncthreads();
}

// C = alpha · S·Sᵀ + beta · Cin for S (M×K, row stride s_ld) of each batch entry; only the lower
// triangle of tiles is computed, each off-diagonal tile stored twice. 1-D grid: batch × tiles.
struct SyrkParams {
    const u16* s;
    i64 s_bs, s_ld;
    int M, K;
    i64 tiles;  // triangle tiles per batch entry
    Epilogue e;
};

__device__ __forceinline__ void syrk_body(const SyrkParams& p) {
    extern __shared__ __align__(128) u16 smem[];
    const i64 b = blockIdx.x / p.tiles;
    i64 ti, tj;
    tri_tile_coords(blockIdx.x % p.tiles, &ti, &tj);
    const int m0 = (int)ti * BM, n0 = (int)tj * BN;
    const u16* s = p.s + b * p.s_bs;
    float acc[4][8][4] = {};
    mainloop<false>(acc, smem, s + (i64)m0 * p.s_ld, p.s_ld, p.M - m0, s + (i64)n0 * p.s_ld, p.s_ld, p.M - n0, p.K);
    stage_acc(acc, (float*)smem, p.e.alpha);
    store_staged<BM, BN>((float*)smem, p.e, b, m0, n0, p.M, p.M, true, threadIdx.x, THREADS);
}

// Y = alpha · A·X + beta · X for A (M×M) and X (M×N). 1-D grid: batch × row tiles × column tiles,
// column tiles fastest (neighbouring blocks share A's row panel).
struct GemmParams {
    const u16* a;
    i64 a_bs, a_ld;
    const u16* x;
    i64 x_bs, x_ld;
    int M, N;
    i64 tiles_n, tiles;  // column tiles, tiles per batch entry
    Epilogue e;
};

__device__ __forceinline__ void gemm_body(const GemmParams& p) {
    extern __shared__ __align__(128) u16 smem[];
    const i64 b = blockIdx.x / p.tiles, t = blockIdx.x % p.tiles;
    const int m0 = (int)(t / p.tiles_n) * BM, n0 = (int)(t % p.tiles_n) * BN;
    float acc[4][8][4] = {};
    mainloop<true>(acc, smem, p.a + b * p.a_bs + (i64)m0 * p.a_ld, p.a_ld, p.M - m0, p.x + b * p.x_bs + n0, p.x_ld,
                   p.N - n0, p.M);
    stage_acc(acc, (float*)smem, p.e.alpha);
    store_staged<BM, BN>((float*)smem, p.e, b, m0, n0, p.M, p.N, false, threadIdx.x, THREADS);
}

__global__ void __launch_bounds__(THREADS) syrk_kernel(SyrkParams p) { syrk_body(p); }
__global__ void __launch_bounds__(THREADS) gemm_kernel(GemmParams p) { gemm_body(p); }

}  // namespace sm80
}  // namespace muon
