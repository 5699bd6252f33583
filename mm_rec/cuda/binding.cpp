// PyTorch binding of the CUDA kernels (scan_kernel.cu, recurrence_kernel.cu): argument checks,
// output and scratch allocation, the current stream. Built just in time by mm_rec/cuda/__init__.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <vector>

#include "recurrence_kernel.h"
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

// ------------------------------------------------------------------ core recurrence
void check_recurrence_launch(cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, "mm_rec CUDA recurrence: launch failed: ", cudaGetErrorString(err));
}

// Multiprocessors of the current device (the callers hold a CUDAGuard on the tensors' device).
int sm_count() {
    int device = 0, count = 0;
    TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "cudaGetDevice failed");
    TORCH_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "cudaDeviceGetAttribute(MultiProcessorCount) failed");
    return count;
}

// Whether the current device has thread-block clusters (compute capability 9.0 or newer).
bool has_clusters() {
    int device = 0, major = 0;
    TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "cudaGetDevice failed");
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
                "cudaDeviceGetAttribute(ComputeCapabilityMajor) failed");
    return major >= 9;
}

// The cluster size that 0 picks for B * H programs of head dim D here (1 on GPUs without clusters).
int default_cluster_size(int64_t programs, int64_t D) {
    return has_clusters() ? mmrec_cuda::recurrence_default_cluster_size(programs, D, sm_count()) : 1;
}

// The cluster size to launch: `requested` (1, 2, 4) or, for 0, the default rule.
int resolve_cluster_size(int64_t requested, int64_t programs, int64_t D) {
    TORCH_CHECK(requested == 0 || requested == 1 || requested == 2 || requested == 4,
                "cluster_size must be 0 (default), 1, 2 or 4, got ", requested);
    const int cs = requested == 0 ? default_cluster_size(programs, D) : static_cast<int>(requested);
    TORCH_CHECK(cs == 1 || has_clusters(), "mm_rec CUDA recurrence: cluster size ", cs,
                " needs thread-block clusters (a GPU of compute capability 9.0 or newer)");
    TORCH_CHECK(mmrec_cuda::recurrence_supported(D, cs), "mm_rec CUDA recurrence: head dim ", D,
                " with cluster size ", cs, " is not built (head dims 32, 64, 128 at cluster size 1; 2 and 4 where ",
                "d / cluster size >= 32)");
    return cs;
}

// A contiguous CUDA tensor on `device` of the given sizes, float32 (fp32_only) or any of float32, bfloat16, float16.
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef sizes, const at::Device& device,
                  bool fp32_only) {
    TORCH_CHECK(t.is_cuda() && t.device() == device, name, " must be a CUDA tensor on ", device);
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.sizes() == sizes, name, " must be ", sizes, ", got ", t.sizes());
    if (fp32_only) {
        TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    } else {
        dtype_of(t, name);  // float32, bfloat16 or float16
    }
}

mmrec_cuda::RecurrenceShape recurrence_shape(const at::Tensor& z) {
    TORCH_CHECK(z.is_cuda() && z.dim() == 4, "z must be a CUDA [B, T, H, d] tensor");
    TORCH_CHECK(z.size(1) >= 1, "z must have T >= 1 steps");
    return {z.size(0), z.size(1), z.size(2), z.size(3)};
}

// (h [B, T, H, d] in z's dtype, h_last [B, H, d], gate [B, T, H, d], states [B, T, H, d] or [0]; fp32
// but h). states is empty when z is fp32 (h is then the state).
std::vector<at::Tensor> recurrence_fwd(const at::Tensor& z, const at::Tensor& log_gamma, const at::Tensor& W_g,
                                       const at::Tensor& b_g, const at::Tensor& h0, int64_t cluster_size) {
    const auto sh = recurrence_shape(z);
    const int64_t B = sh.B, T = sh.T, H = sh.H, D = sh.D;
    const at::Device dev = z.device();
    check_tensor(z, "z", {B, T, H, D}, dev, false);
    check_tensor(log_gamma, "log_gamma", {B, T, H, D}, dev, false);
    check_tensor(W_g, "W_g", {H, D, D}, dev, true);
    check_tensor(b_g, "b_g", {H, D}, dev, true);
    check_tensor(h0, "h0", {B, H, D}, dev, true);
    const c10::cuda::CUDAGuard guard(dev);
    const int cs = resolve_cluster_size(cluster_size, B * H, D);
    const bool store_states = z.scalar_type() != at::kFloat;
    const auto f32 = z.options().dtype(at::kFloat);
    at::Tensor h = at::empty_like(z);
    at::Tensor h_last = at::empty({B, H, D}, f32);
    at::Tensor gate = at::empty({B, T, H, D}, f32);
    at::Tensor states = store_states ? at::empty({B, T, H, D}, f32) : at::empty({0}, f32);
    mmrec_cuda::RecurrenceFwdArgs args;
    args.shape = sh;
    args.z = z.data_ptr();
    args.z_dtype = dtype_of(z, "z");
    args.log_gamma = log_gamma.data_ptr();
    args.lg_dtype = dtype_of(log_gamma, "log_gamma");
    args.W = W_g.data_ptr<float>();
    args.bias = b_g.data_ptr<float>();
    args.h0 = h0.data_ptr<float>();
    args.h = h.data_ptr();
    args.h_last = h_last.data_ptr<float>();
    args.gate = gate.data_ptr<float>();
    args.states = store_states ? states.data_ptr<float>() : nullptr;
    check_recurrence_launch(mmrec_cuda::recurrence_forward(args, cs, c10::cuda::getCurrentCUDAStream()));
    return {h, h_last, gate, states};
}

// (dz in z's dtype, d log_gamma in log_gamma's dtype, dp [B, T, H, d] (row t: dp_{t+1}; row T-1: 0),
// dp0 [B, H, d], db [B, H, d] (sum over t of dp_t), dh0 [B, H, d]; fp32 but dz and d log_gamma).
// `states`: the forward's fp32 states (h itself when z is fp32).
std::vector<at::Tensor> recurrence_bwd(const at::Tensor& dh, const at::Tensor& dh_last, const at::Tensor& z,
                                       const at::Tensor& log_gamma, const at::Tensor& W_g, const at::Tensor& h0,
                                       const at::Tensor& gate, const at::Tensor& states, int64_t cluster_size) {
    const auto sh = recurrence_shape(z);
    const int64_t B = sh.B, T = sh.T, H = sh.H, D = sh.D;
    const at::Device dev = z.device();
    check_tensor(dh, "dh", {B, T, H, D}, dev, false);
    check_tensor(dh_last, "dh_last", {B, H, D}, dev, true);
    check_tensor(z, "z", {B, T, H, D}, dev, false);
    check_tensor(log_gamma, "log_gamma", {B, T, H, D}, dev, false);
    check_tensor(W_g, "W_g", {H, D, D}, dev, true);
    check_tensor(h0, "h0", {B, H, D}, dev, true);
    check_tensor(gate, "gate", {B, T, H, D}, dev, true);
    check_tensor(states, "states", {B, T, H, D}, dev, true);
    const c10::cuda::CUDAGuard guard(dev);
    const int cs = resolve_cluster_size(cluster_size, B * H, D);
    const auto f32 = z.options().dtype(at::kFloat);
    at::Tensor dz = at::empty_like(z);
    at::Tensor dlg = at::empty_like(log_gamma);
    at::Tensor dp = at::empty({B, T, H, D}, f32);
    at::Tensor dp0 = at::empty({B, H, D}, f32);
    at::Tensor db = at::empty({B, H, D}, f32);
    at::Tensor dh0 = at::empty({B, H, D}, f32);
    mmrec_cuda::RecurrenceBwdArgs args;
    args.shape = sh;
    args.dh = dh.data_ptr();
    args.dh_dtype = dtype_of(dh, "dh");
    args.dh_last = dh_last.data_ptr<float>();
    args.z = z.data_ptr();
    args.z_dtype = dtype_of(z, "z");
    args.log_gamma = log_gamma.data_ptr();
    args.lg_dtype = dtype_of(log_gamma, "log_gamma");
    args.W = W_g.data_ptr<float>();
    args.gate = gate.data_ptr<float>();
    args.states = states.data_ptr<float>();
    args.h0 = h0.data_ptr<float>();
    args.dz = dz.data_ptr();
    args.dlg = dlg.data_ptr();
    args.dp = dp.data_ptr<float>();
    args.dp0 = dp0.data_ptr<float>();
    args.db = db.data_ptr<float>();
    args.dh0 = dh0.data_ptr<float>();
    check_recurrence_launch(mmrec_cuda::recurrence_backward(args, cs, c10::cuda::getCurrentCUDAStream()));
    return {dz, dlg, dp, dp0, db, dh0};
}

// The cluster size that cluster_size = 0 picks for B * H programs of head dim d on this device.
int64_t recurrence_cluster_size(int64_t programs, int64_t d) {
    return default_cluster_size(programs, d);
}

// Clusters of (head dim d, cluster size) resident at once on this device (diagnostic; < 0 on error).
int64_t recurrence_max_active_clusters(int64_t d, int64_t cluster_size, bool forward) {
    TORCH_CHECK(mmrec_cuda::recurrence_supported(d, static_cast<int>(cluster_size)), "unsupported d ", d,
                " / cluster size ", cluster_size);
    TORCH_CHECK(cluster_size == 1 || has_clusters(), "cluster size ", cluster_size, " needs compute capability 9.0");
    return mmrec_cuda::recurrence_max_active_clusters(d, static_cast<int>(cluster_size), forward, sm_count());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "MM-Rec CUDA kernels: single-pass log-space scan, core recurrence (forward, backward)";
    m.def("scan_fwd", &scan_fwd, "scan forward", py::arg("log_a"), py::arg("b"), py::arg("h0"),
          py::arg("clamp_min"), py::arg("clamp_max"));
    m.def("scan_bwd", &scan_bwd, "scan backward", py::arg("dh"), py::arg("d_final"), py::arg("log_a"), py::arg("h"),
          py::arg("h0"), py::arg("clamp_min"), py::arg("clamp_max"));
    m.def("recurrence_fwd", &recurrence_fwd, "core recurrence forward", py::arg("z"), py::arg("log_gamma"),
          py::arg("W_g"), py::arg("b_g"), py::arg("h0"), py::arg("cluster_size"));
    m.def("recurrence_bwd", &recurrence_bwd, "core recurrence backward", py::arg("dh"), py::arg("dh_last"),
          py::arg("z"), py::arg("log_gamma"), py::arg("W_g"), py::arg("h0"), py::arg("gate"), py::arg("states"),
          py::arg("cluster_size"));
    m.def("recurrence_cluster_size", &recurrence_cluster_size, "default cluster size", py::arg("programs"),
          py::arg("d"));
    m.def("recurrence_max_active_clusters", &recurrence_max_active_clusters, "resident clusters (diagnostic)",
          py::arg("d"), py::arg("cluster_size"), py::arg("forward"));
}
