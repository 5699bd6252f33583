// PyTorch binding of the CUDA scan (scan_kernel.cu): argument checks, output and scratch
// allocation, the current stream. Built just in time by mm_rec/cuda/__init__.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <vector>

#include "scan_kernel.h"

namespace {

using mmrec_cuda::DType;

DType dtype_of(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return DType::kFloat32;
        case at::kBFloat16: return DType::kBFloat16;
        case at::kHalf: return DType::kFloat16;
        default: TORCH_CHECK(false, name, ": dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
    }
    return DType::kFloat32;
}

// log_a as [B, T, D] or [B, T, K, M] (D = K * M) with any strides: the kernel reads it in place.
mmrec_cuda::LogAView log_a_view(const at::Tensor& log_a, const at::Tensor& b) {
    TORCH_CHECK(log_a.is_cuda(), "log_a must be a CUDA tensor");
    TORCH_CHECK(log_a.dim() == 3 || log_a.dim() == 4, "log_a must be [B, T, D] or [B, T, K, M]");
    TORCH_CHECK(log_a.size(0) == b.size(0) && log_a.size(1) == b.size(1), "log_a and b: different [B, T]");
    const int64_t channels = log_a.dim() == 3 ? log_a.size(2) : log_a.size(2) * log_a.size(3);
    TORCH_CHECK(channels == b.size(2), "log_a has ", channels, " channels, b ", b.size(2));
    const DType la = dtype_of(log_a, "log_a");
    TORCH_CHECK(la == DType::kFloat32 || la == dtype_of(b, "b"), "log_a must be float32 or b's dtype");
    mmrec_cuda::LogAView v;
    v.data = log_a.data_ptr();
    v.dtype = la;
    v.stride_batch = log_a.stride(0);
    v.stride_time = log_a.stride(1);
    if (log_a.dim() == 3) {
        v.channel_inner = log_a.size(2);
        v.stride_inner = log_a.stride(2);
        v.stride_outer = 0;
    } else {
        v.channel_inner = log_a.size(3);
        v.stride_inner = log_a.stride(3);
        v.stride_outer = log_a.stride(2);
    }
    return v;
}

const float* optional_state(const std::optional<at::Tensor>& t, const at::Tensor& b, const char* name) {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous(), name,
                " must be a contiguous float32 CUDA tensor");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == b.size(0) && t->size(1) == b.size(2), name, " must be [B, D]");
    return t->data_ptr<float>();
}

mmrec_cuda::Workspace workspace(int64_t B, int64_t T, int64_t D, const at::Tensor& like,
                                std::vector<at::Tensor>& keep) {
    keep.push_back(at::zeros({static_cast<int64_t>(mmrec_cuda::workspace_ints(B, T, D))},
                             like.options().dtype(at::kInt)));
    keep.push_back(at::empty({static_cast<int64_t>(mmrec_cuda::workspace_floats(B, T, D))},
                             like.options().dtype(at::kFloat)));
    return {keep[0].data_ptr<int>(), keep[1].data_ptr<float>()};
}

void check_launch(cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, "mm_rec CUDA scan: launch failed: ", cudaGetErrorString(err));
}

// (h [B, T, D] in b's dtype, final_state [B, D] fp32)
std::vector<at::Tensor> scan_fwd(const at::Tensor& log_a, const at::Tensor& b, const std::optional<at::Tensor>& h0,
                                 double clamp_min, double clamp_max) {
    TORCH_CHECK(b.is_cuda() && b.dim() == 3 && b.is_contiguous(), "b must be a contiguous CUDA [B, T, D] tensor");
    const c10::cuda::CUDAGuard guard(b.device());
    const int64_t B = b.size(0), T = b.size(1), D = b.size(2);
    mmrec_cuda::ScanFwdArgs args;
    args.shape = {B, T, D, static_cast<float>(clamp_min), static_cast<float>(clamp_max)};
    args.log_a = log_a_view(log_a, b);
    args.b = b.data_ptr();
    args.b_dtype = dtype_of(b, "b");
    args.h0 = optional_state(h0, b, "h0");
    at::Tensor h = at::empty_like(b);
    at::Tensor final_state = at::empty({B, D}, b.options().dtype(at::kFloat));
    args.h = h.data_ptr();
    args.final_state = final_state.data_ptr<float>();
    std::vector<at::Tensor> keep;
    const auto ws = workspace(B, T, D, b, keep);
    check_launch(mmrec_cuda::scan_forward(args, ws, c10::cuda::getCurrentCUDAStream()));
    return {h, final_state};
}

// (d log_a [B, T, D] contiguous in log_a's dtype, db [B, T, D] in h's dtype, dh0 [B, D] fp32)
std::vector<at::Tensor> scan_bwd(const at::Tensor& dh, const std::optional<at::Tensor>& d_final,
                                 const at::Tensor& log_a, const at::Tensor& h, const std::optional<at::Tensor>& h0,
                                 double clamp_min, double clamp_max) {
    TORCH_CHECK(h.is_cuda() && h.dim() == 3 && h.is_contiguous(), "h must be a contiguous CUDA [B, T, D] tensor");
    TORCH_CHECK(dh.sizes() == h.sizes() && dh.scalar_type() == h.scalar_type(), "dh must match h");
    const c10::cuda::CUDAGuard guard(h.device());
    const at::Tensor grad = dh.contiguous();
    const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
    mmrec_cuda::ScanBwdArgs args;
    args.shape = {B, T, D, static_cast<float>(clamp_min), static_cast<float>(clamp_max)};
    args.log_a = log_a_view(log_a, h);
    args.dh = grad.data_ptr();
    args.d_final = optional_state(d_final, h, "d_final");
    args.h = h.data_ptr();
    args.h_dtype = dtype_of(h, "h");
    args.h0 = optional_state(h0, h, "h0");
    at::Tensor db = at::empty_like(h);
    at::Tensor d_log_a = at::empty({B, T, D}, h.options().dtype(log_a.scalar_type()));
    at::Tensor dh0 = at::empty({B, D}, h.options().dtype(at::kFloat));
    args.db = db.data_ptr();
    args.d_log_a = d_log_a.data_ptr();
    args.dh0 = dh0.data_ptr<float>();
    std::vector<at::Tensor> keep;
    const auto ws = workspace(B, T, D, h, keep);
    check_launch(mmrec_cuda::scan_backward(args, ws, c10::cuda::getCurrentCUDAStream()));
    return {d_log_a, db, dh0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "MM-Rec CUDA kernels: single-pass log-space scan (forward, backward)";
    m.def("scan_fwd", &scan_fwd, "scan forward", py::arg("log_a"), py::arg("b"), py::arg("h0"),
          py::arg("clamp_min"), py::arg("clamp_max"));
    m.def("scan_bwd", &scan_bwd, "scan backward", py::arg("dh"), py::arg("d_final"), py::arg("log_a"), py::arg("h"),
          py::arg("h0"), py::arg("clamp_min"), py::arg("clamp_max"));
}
