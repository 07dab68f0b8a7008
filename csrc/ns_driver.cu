// The NS driver: normalization and every step for a whole batch, enqueued on the caller's stream.
// Allocation-free and sync-free (the caller passes a workspace), hence CUDA-graph capturable.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "ns_api.h"
#include "ns_launch.cuh"

#ifndef MUON_CUDA_ARCHS_STR
#define MUON_CUDA_ARCHS_STR "unknown"
#endif

namespace muon {

namespace {

constexpr size_t ALIGN = 256;
size_t aligned(size_t bytes) { return (bytes + ALIGN - 1) / ALIGN * ALIGN; }

// Leading dimensions of the workspace copies: multiples of 8 bf16 (16 B) so that every row is
// aligned for cp.async and TMA, whatever m and n are.
i64 ld_of(i64 cols) { return round_up(cols, 8); }

struct Layout {
    size_t x0, x1, a, b, parts, total;
};

Layout layout(i64 batch, i64 m, i64 n) {
    Layout l;
    const size_t xs = aligned((size_t)(batch * m * ld_of(n)) * 2), as = aligned((size_t)(batch * m * ld_of(m)) * 2);
    l.x0 = 0;
    l.x1 = l.x0 + xs;
    l.a = l.x1 + xs;
    l.b = l.a + as;
    l.parts = l.b + as;
    l.total = l.parts + aligned((size_t)(2 * batch * norm_parts(m, n)) * sizeof(double));
    return l;
}

void require(bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument(what);
}

}  // namespace

#ifndef MUON_HAVE_SM90A
// Built without 90a: the Hopper path reports itself missing (select_path never picks it).
void launch_syrk_sm90(Operand, int, int, const Epilogue&, i64, cudaStream_t) {
    throw std::runtime_error("muon._C was built without sm_90a");
}
void launch_gemm_sm90(Operand, Operand, int, int, const Epilogue&, i64, cudaStream_t) {
    throw std::runtime_error("muon._C was built without sm_90a");
}
cudaError_t probe_sm90() { return cudaErrorNoKernelImageForDevice; }
#endif

int norm_parts(i64 m, i64 n) {
    // ~16 elements a thread per pass; at most 256 partials a matrix (each block re-reads them all).
    return (int)std::max<i64>(1, std::min<i64>(256, ceil_div(m * n, (i64)NORM_THREADS * 16)));
}

size_t workspace_bytes(i64 batch, i64 m, i64 n) { return layout(batch, m, n).total; }

std::string built_archs() { return MUON_CUDA_ARCHS_STR; }

bool built_sm90() {
#ifdef MUON_HAVE_SM90A
    return true;
#else
    return false;
#endif
}

int select_path(int requested, std::string* why) {
    int device = 0, count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        cudaGetLastError();
        *why = std::string("no CUDA GPU is visible (") + (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") +
               "); run on a machine with an NVIDIA GPU or use backend='torch'";
        return -1;
    }
    cudaGetDevice(&device);
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    const std::string cc = std::to_string(major) + "." + std::to_string(minor);
    const std::string rebuild = "; rebuild the extension for it (MUON_CUDA_ARCHS=\"" + std::to_string(major) +
                                std::to_string(minor) + (major == 9 ? "a" : "") +
                                "\" pip install --no-build-isolation muon) or use backend='triton'";
    if (major < 8) {
        *why = "muon's CUDA kernels need bf16 tensor cores (compute capability >= 8.0); this GPU is sm_" +
               std::to_string(major) + std::to_string(minor) + "; use backend='triton' or backend='torch'";
        return -1;
    }
    const bool hopper = major == 9 && minor == 0;
    if ((requested == kPathSm90 || requested == kPathAuto) && hopper && built_sm90() && probe_sm90() == cudaSuccess)
        return kPathSm90;
    if (requested == kPathSm90) {
        *why = "the wgmma kernels need an sm_90 GPU and a build with 90a in MUON_CUDA_ARCHS (built for " +
               built_archs() + ", this GPU is compute capability " + cc + ")" + (hopper ? rebuild : std::string());
        return -1;
    }
    err = probe_sm80();
    if (err != cudaSuccess) {
        *why = "muon._C has no kernel image for this GPU (compute capability " + cc + "; built for " + built_archs() +
               ": " + cudaGetErrorString(err) + ")" + rebuild;
        return -1;
    }
    return kPathSm80;
}

void newton_schulz(const NsArgs& a) {
    require(a.batch >= 0 && a.m >= 0 && a.n >= 0, "batch, m and n must be >= 0");
    require(a.m <= a.n, "m must be <= n (transpose tall matrices first)");
    require(a.coeffs.size() % 3 == 0, "coeffs must hold (a, b, c) per step");
    require(a.m < (1 << 30) && a.n < (1 << 30), "m and n must be < 2^30");
    require(a.in != nullptr && a.out != nullptr, "in and out must be device pointers");
    if (a.batch == 0 || a.m == 0) return;
    const Layout l = layout(a.batch, a.m, a.n);
    require(a.workspace != nullptr && a.workspace_size >= l.total,
            "workspace must hold workspace_bytes(batch, m, n) = " + std::to_string(l.total) + " bytes");
    std::string why;
    const int path = select_path(a.path, &why);
    if (path < 0) throw std::runtime_error(why);

    char* ws = static_cast<char*>(a.workspace);
    const i64 m = a.m, n = a.n, ldn = ld_of(n), ldm = ld_of(m);
    u16* x[2] = {reinterpret_cast<u16*>(ws + l.x0), reinterpret_cast<u16*>(ws + l.x1)};
    u16* A = reinterpret_cast<u16*>(ws + l.a);
    u16* B = reinterpret_cast<u16*>(ws + l.b);
    const int steps = (int)(a.coeffs.size() / 3);

    NormParams np;
    np.in = a.in;
    np.in_bs = a.in_bs;
    np.in_rs = a.in_rs;
    np.in_cs = a.in_cs;
    np.m = m;
    np.n = n;
    np.parts = norm_parts(m, n);
    np.part_amax = reinterpret_cast<double*>(ws + l.parts);
    np.part_ss = np.part_amax + a.batch * np.parts;
    np.fro_scale = a.fro_scale;
    np.eps = a.eps;
    if (steps == 0) {  // X0 itself is the result
        np.out = static_cast<u16*>(a.out);
        np.out_bs = a.out_bs;
        np.out_rs = a.out_rs;
        np.out_cs = a.out_cs;
    } else {
        np.out = x[0];
        np.out_bs = m * ldn;
        np.out_rs = ldn;
        np.out_cs = 1;
    }
    launch_normalize(np, a.in_dtype, a.batch, a.stream);

    auto syrk = path == kPathSm90 ? launch_syrk_sm90 : launch_syrk_sm80;
    auto gemm = path == kPathSm90 ? launch_gemm_sm90 : launch_gemm_sm80;
    for (int s = 0; s < steps; ++s) {
        const float ca = a.coeffs[3 * s], cb = a.coeffs[3 * s + 1], cc = a.coeffs[3 * s + 2];
        const Operand X{x[s % 2], m * ldn, ldn}, Ag{A, m * ldm, ldm}, Bg{B, m * ldm, ldm};
        // A = X·Xᵀ
        syrk(X, (int)m, (int)n, Epilogue{nullptr, 0, 0, A, m * ldm, ldm, 1, 1.f, 0.f}, a.batch, a.stream);
        // B = b·A + c·A·A (A is symmetric, so A·A = A·Aᵀ: the same Gram kernel, K = m)
        syrk(Ag, (int)m, (int)m, Epilogue{A, m * ldm, ldm, B, m * ldm, ldm, 1, cc, cb}, a.batch, a.stream);
        // X' = a·X + B·X, into the other buffer, or the caller's output after the last step
        const bool last = s == steps - 1;
        Epilogue e{X.p, m * ldn, ldn, last ? static_cast<u16*>(a.out) : x[(s + 1) % 2],
                   last ? a.out_bs : m * ldn, last ? a.out_rs : ldn, last ? a.out_cs : 1, 1.f, ca};
        gemm(Bg, X, (int)m, (int)n, e, a.batch, a.stream);
    }
}

}  // namespace muon
