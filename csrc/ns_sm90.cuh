// The Hopper path (sm_90a): TMA loads into 128-B-swizzled shared memory, wgmma (HGMMA) from shared
// memory descriptors, fp32 accumulators in registers, a warp-specialized pipeline.
//
// Written directly on PTX rather than CUTLASS/CuTe (see ns_sm80.cuh for the build-time and NVRTC
// reasons); the whole mainloop is ~100 lines: one producer warpgroup (a single thread issues the
// TMA copies), two consumer warpgroups that each own 64 rows of the 128-row tile, STAGES-deep
// full/empty mbarrier ring. The consumers keep one wgmma group in flight (wait_group 1) and free a
// stage as soon as the group reading it has retired.
//
// Tiles: 128×128×64 for the symmetric Gram products (one triangle of tiles, mirrored store) and
// 128×BN×64 for B·X. Operand A is always K-major (rows of X, of A or of B); operand B is K-major for
// the Gram products (again rows) and MN-major for B·X (X's rows run along N), read with wgmma's
// transpose-B bit. TMA zero-fills out-of-bounds boxes, so any m and n work.
#pragma once
#include <cuda.h>

#include "ns_device.cuh"
#include "wgmma_ops.cuh"

namespace muon {
namespace sm90 {

constexpr int BM = 128, BK = 64, STAGES = 4, CONSUMERS = 2, THREADS = 128 * (CONSUMERS + 1);
constexpr int A_STAGE_BYTES = BM * BK * 2;  // 16 KB
constexpr int ATOM_BYTES = 1024;            // 8 rows × 128 B: one 128-B swizzle atom
constexpr int MN_BOX_BYTES = 64 * BK * 2;   // one MN-major box: 64 k rows × 64 columns

template <int BN>
constexpr int smem_bytes() {
    // ring + barriers + alignment slack; the fp32 epilogue tile (BM × (BN + 1)) reuses the ring
    return STAGES * (A_STAGE_BYTES + BN * BK * 2) + 2 * STAGES * 8 + ATOM_BYTES;
}

struct Params {
    int M, N, K;  // output M×N, reduction K
    i64 tiles_m, tiles_n, tiles;  // tile grid; `tiles` per batch entry (the triangle when symmetric)
    Epilogue e;
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(smem_u32(bar)), "r"(parity)
            : "memory");
    }
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem_u32(dst)),
        "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor, 128-B swizzle (layout type 1 in bits 62-63). K-major operands:
// rows of 128 B, 8-row atoms SBO = 1024 B apart, LBO unused. MN-major operands: 64-column boxes
// LBO apart along MN, 8-k-row atoms SBO = 1024 B apart along K (CUTLASS's make_gmma_desc).
__device__ __forceinline__ u64 make_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) |
           ((u64)1 << 62);
}

#endif

// SYM: C = alpha·S·Sᵀ + beta·Cin over the lower triangle of 128×128 tiles, mirrored (BN == BM).
// B_MN: Y = alpha·A·X + beta·X with X read MN-major. tm_a / tm_b: 3-D tensor maps (cols, rows, batch).
template <int BN, bool B_MN, bool SYM>
__global__ void __launch_bounds__(THREADS, 1)
    wgmma_kernel(const __grid_constant__ CUtensorMap tm_a, const __grid_constant__ CUtensorMap tm_b, Params p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(!SYM || BN == BM, "symmetric tiles are square");
    static_assert(BM * (BN + 1) * 4 <= STAGES * (A_STAGE_BYTES + BN * BK * 2), "epilogue tile fits the ring");
    constexpr int B_STAGE_BYTES = BN * BK * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // 128-B swizzled TMA boxes and the descriptors' swizzle phase both assume 1024-B aligned atoms.
    unsigned char* smem = (unsigned char*)(((u64)smem_raw + ATOM_BYTES - 1) & ~(u64)(ATOM_BYTES - 1));
    unsigned char* sa = smem;
    unsigned char* sb = smem + STAGES * A_STAGE_BYTES;
    u64* full = (u64*)(sb + STAGES * B_STAGE_BYTES);
    u64* empty = full + STAGES;

    const i64 b = blockIdx.x / p.tiles, t = blockIdx.x % p.tiles;
    i64 ti, tj;
    if (SYM) {
        tri_tile_coords(t, &ti, &tj);
    } else {
        ti = t / p.tiles_n;
        tj = t % p.tiles_n;
    }
    const int m0 = (int)ti * BM, n0 = (int)tj * BN;
    const int KT = (int)ceil_div(p.K, BK);
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: one thread streams the K panels through the ring.
        if (tid == 0) {
            for (int kt = 0; kt < KT; ++kt) {
                const int s = kt % STAGES;
                if (kt >= STAGES) mbar_wait(&empty[s], ((kt / STAGES) - 1) & 1);
                // Out-of-bounds parts of a box are zero-filled and still counted in the bytes.
                mbar_expect_tx(&full[s], A_STAGE_BYTES + B_STAGE_BYTES);
                tma_load_3d(sa + s * A_STAGE_BYTES, &tm_a, kt * BK, m0, (int)b, &full[s]);
                if (B_MN) {
#pragma unroll
                    for (int q = 0; q < BN / 64; ++q)
                        tma_load_3d(sb + s * B_STAGE_BYTES + q * MN_BOX_BYTES, &tm_b, n0 + 64 * q, kt * BK, (int)b,
                                    &full[s]);
                } else {
                    tma_load_3d(sb + s * B_STAGE_BYTES, &tm_b, kt * BK, n0, (int)b, &full[s]);
                }
            }
        }
        return;
    }

    // Consumers: warpgroup c computes rows [64c, 64c + 64) of the tile.
    const int c = wg - 1;
    float acc[BN / 2];
#pragma unroll
    for (int r = 0; r < BN / 2; ++r) acc[r] = 0.f;
    for (int kt = 0; kt < KT; ++kt) {
        const int s = kt % STAGES;
        mbar_wait(&full[s], (kt / STAGES) & 1);
        const u32 a_base = smem_u32(sa + s * A_STAGE_BYTES) + c * 64 * 128;
        const u32 b_base = smem_u32(sb + s * B_STAGE_BYTES);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            // K-major: the k16 slice starts 32 B into each 128-B row (the swizzle is applied to the
            // absolute address, so the offset composes with it). MN-major: 16 k rows further down.
            const u64 da = make_desc(a_base + ks * 32, 16, ATOM_BYTES);
            const u64 db = B_MN ? make_desc(b_base + ks * 16 * 128, MN_BOX_BYTES, ATOM_BYTES)
                                : make_desc(b_base + ks * 32, 16, ATOM_BYTES);
            if constexpr (BN == 256)
                wgmma_m64n256k16<B_MN ? 1 : 0>(acc, da, db, 1);
            else
                wgmma_m64n128k16<B_MN ? 1 : 0>(acc, da, db, 1);
        }
        wgmma_commit();
        // Keep this k-tile's group in flight; the previous one has retired, so its stage is free.
        wgmma_wait<1>();
        if (kt > 0 && tid == 0) mbar_arrive(&empty[(kt - 1) % STAGES]);
    }
    wgmma_wait<0>();

    // Epilogue through shared memory: every stage has been consumed, so the ring is free. Only the
    // two consumer warpgroups take part (named barrier 1; the producer has exited).
    float* tile = reinterpret_cast<float*>(smem);
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * CONSUMERS) : "memory");
#pragma unroll
    for (int r = 0; r < BN / 2; r += 2) {
        int row, col;
        wgmma_acc_coord(tid, r, &row, &col);
        StagedTile<BN>::put(tile, 64 * c + row, col, p.e.alpha * acc[r], p.e.alpha * acc[r + 1]);
    }
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * CONSUMERS) : "memory");
    store_staged<BM, BN>(tile, p.e, b, m0, n0, p.M, p.N, SYM, threadIdx.x - 128, 128 * CONSUMERS);
#endif
}

}  // namespace sm90
}  // namespace muon
