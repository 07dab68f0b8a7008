// The host API of muon's CUDA kernels: plain pointers, strides, dtype codes and a stream. No PyTorch
// headers: bindings.cpp wraps it with pybind11; any framework can call it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <vector>

#include "ns_index.h"

namespace muon {

enum Path { kPathAuto = -1, kPathSm80 = 0, kPathSm90 = 1 };

struct NsArgs {
    const void* in = nullptr;  // (batch, m, n), m <= n, element strides below
    int in_dtype = 0;          // DType: 0 fp32, 1 bf16, 2 fp16, 3 fp64
    i64 batch = 0, m = 0, n = 0;
    i64 in_bs = 0, in_rs = 0, in_cs = 0;
    void* out = nullptr;  // bf16 (batch, m, n), element strides below
    i64 out_bs = 0, out_rs = 0, out_cs = 0;
    std::vector<float> coeffs;  // (a, b, c) per step
    float fro_scale = 1.f, eps = 1e-7f;
    void* workspace = nullptr;  // device memory of at least workspace_bytes(batch, m, n)
    size_t workspace_size = 0;
    cudaStream_t stream = nullptr;
    int path = kPathAuto;
};

// Bytes of device workspace one call needs: two bf16 copies of X, the Gram A and B = bA + cA²,
// and the normalization partials. Allocate once and reuse; the call itself allocates nothing.
size_t workspace_bytes(i64 batch, i64 m, i64 n);

// Runs normalization and every NS step on args.stream: enqueues kernels only (no host sync, no
// allocation), so it can be captured in a CUDA graph. Throws std::invalid_argument for bad
// arguments and std::runtime_error naming the cause when the GPU cannot run it.
void newton_schulz(const NsArgs& args);

// The kernel path the current device would take; on failure returns -1 and sets *why to the cause
// and its fix (no GPU, an arch this build lacks, compute capability below 8.0).
int select_path(int requested, std::string* why);

std::string built_archs();  // the MUON_CUDA_ARCHS this module was compiled for
bool built_sm90();          // whether the wgmma/TMA kernels are in this build
int norm_parts(i64 m, i64 n);  // blocks per matrix of the normalization passes

}  // namespace muon
