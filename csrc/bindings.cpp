// pybind11 bindings of muon._C: raw device pointers (ints), element strides, a dtype code and a
// stream handle, so the module builds without PyTorch headers and serves torch, CuPy or any
// DLPack producer. The index-math helpers are exposed for the CPU unit tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "ns_api.h"
#include "ns_index.h"

namespace py = pybind11;
using muon::i64;

namespace {

void run(std::uintptr_t in, int in_dtype, i64 batch, i64 m, i64 n, std::tuple<i64, i64, i64> in_strides,
         std::uintptr_t out, std::tuple<i64, i64, i64> out_strides, std::vector<float> coeffs, float fro_scale,
         float eps, std::uintptr_t workspace, size_t workspace_size, std::uintptr_t stream, int path) {
    muon::NsArgs a;
    a.in = reinterpret_cast<const void*>(in);
    a.in_dtype = in_dtype;
    a.batch = batch;
    a.m = m;
    a.n = n;
    std::tie(a.in_bs, a.in_rs, a.in_cs) = in_strides;
    a.out = reinterpret_cast<void*>(out);
    std::tie(a.out_bs, a.out_rs, a.out_cs) = out_strides;
    a.coeffs = std::move(coeffs);
    a.fro_scale = fro_scale;
    a.eps = eps;
    a.workspace = reinterpret_cast<void*>(workspace);
    a.workspace_size = workspace_size;
    a.stream = reinterpret_cast<cudaStream_t>(stream);
    a.path = path;
    py::gil_scoped_release release;  // only enqueues work, but never hold the GIL across CUDA calls
    muon::newton_schulz(a);
}

py::object device_path(int requested) {
    std::string why;
    int path = muon::select_path(requested, &why);
    if (path < 0) return py::str(why);
    return py::int_(path);
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "muon's CUDA Newton–Schulz kernels (see csrc/). Importing never touches the GPU.";
    mod.def("newton_schulz", &run, py::arg("inp"), py::arg("in_dtype"), py::arg("batch"), py::arg("m"), py::arg("n"),
            py::arg("in_strides"), py::arg("out"), py::arg("out_strides"), py::arg("coeffs"), py::arg("fro_scale"),
            py::arg("eps"), py::arg("workspace"), py::arg("workspace_size"), py::arg("stream"), py::arg("path") = -1,
            "Normalize and run every NS step on `stream` (bf16 output). Enqueues only: no sync, no allocation.");
    mod.def("workspace_bytes", &muon::workspace_bytes, py::arg("batch"), py::arg("m"), py::arg("n"));
    mod.def("device_path", &device_path, py::arg("requested") = -1,
            "0 (mma.sync) or 1 (wgmma) for the current device, or a string with the reason it cannot run.");
    mod.def("built_archs", &muon::built_archs);
    mod.def("built_sm90", &muon::built_sm90);
    mod.def("norm_parts", &muon::norm_parts);
    mod.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1, py::arg("float16") = 2,
                                       py::arg("float64") = 3);

    // Host-side index math, for the CPU unit tests (the kernels use the same functions).
    mod.def("tri_tile_count", &muon::tri_tile_count);
    mod.def("tri_tile_coords", [](i64 b) {
        i64 i, j;
        muon::tri_tile_coords(b, &i, &j);
        return std::make_pair(i, j);
    });
    mod.def("mma_acc_coord", [](int lane, int r) {
        int row, col;
        muon::mma_acc_coord(lane, r, &row, &col);
        return std::make_pair(row, col);
    });
    mod.def("wgmma_acc_coord", [](int thread, int r) {
        int row, col;
        muon::wgmma_acc_coord(thread, r, &row, &col);
        return std::make_pair(row, col);
    });
    mod.def("sm80_kmajor_offset", &muon::sm80_kmajor_offset);
    mod.def("sm80_mnmajor_offset", &muon::sm80_mnmajor_offset);
    mod.def("bank_slot", &muon::bank_slot);
    mod.attr("SM80_BK") = muon::SM80_BK;
    mod.attr("SM80_BN") = muon::SM80_BN;
}
