// Bindings for linear attention: argument checks (each naming the argument) and the
// parameter structs of longattn/linear_attention.h. module.cpp calls
// register_linear_attention.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "backend.h"
#include "checks.h"
#include "torch_view.h"
#include "longattn/errors.h"
#if defined(LONGATTN_WITH_CUDA)
#include "longattn/cuda_runtime_info.h"
#endif
#include "longattn/linear_attention.h"
#include "longattn/tensor.h"
#include "nvtx.h"

namespace py = pybind11;

namespace longattn {
namespace {

struct LinearArgs {
  const TensorView* initial_state;
  const TensorView* initial_z;
  const TensorView* log_decay;
  const TensorView* cu_seqlens;
  double scale;
  int feature_map;
  bool causal, normalize;
  int64_t chunk_size;
  int64_t max_seqlen = 0;  // packed input on CUDA: the longest sequence (from the host check)
};

DType compute_dtype(DType t) { return t == DType::Float64 ? DType::Float64 : DType::Float32; }

void copy_strides(const TensorView& t, int64_t* s) {
  s[0] = t.stride[0];
  s[1] = t.stride[1];
  s[2] = t.stride[2];
}

bool contiguous(const TensorView& t) {
  int64_t acc = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.stride[d] != acc) return false;
    acc *= t.shape[d];
  }
  return true;
}

// A state-like array: compute dtype, exact shape, contiguous, on q's device.
void check_state(const char* op, const char* name, const TensorView& t, const TensorView& q,
                 std::initializer_list<int64_t> shape) {
  using namespace checks;
  const DType cd = compute_dtype(q.dtype);
  LONGATTN_CHECK_TYPE(t.dtype == cd, cat(op, ": ", name, " must be ", dtype_name(cd), " (the state dtype for ",
                                         dtype_name(q.dtype), " inputs), got ", dtype_name(t.dtype)));
  same_device(op, name, t, "q", q);
  bool ok = t.ndim == int(shape.size());
  int d = 0;
  for (int64_t s : shape) ok = ok && t.shape[d++] == s;
  if (!ok) {
    std::string want = "(";
    d = 0;
    for (int64_t s : shape) want += (d++ ? ", " : "") + std::to_string(s);
    want += ")";
    raise(ErrorKind::Value, cat(op, ": ", name, " must have shape ", want, ", got ", shape_str(t)));
  }
  LONGATTN_CHECK_VALUE(contiguous(t), cat(op, ": ", name, " must be contiguous"));
}

LinearAttentionParams make_params(const char* op, const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView* out, const LinearArgs& a) {
  using namespace checks;
  const bool cuda = q.device == DeviceType::CUDA;
  const char* layout = "(batch, seqlen, heads, head_dim)";
  ndim(op, "q", q, 4, layout);
  ndim(op, "k", k, 4, layout);
  ndim(op, "v", v, 4, layout);
  float_dtype(op, "q", q, cuda);
  same_dtype(op, "k", k, "q", q);
  same_dtype(op, "v", v, "q", q);
  same_device(op, "k", k, "q", q);
  same_device(op, "v", v, "q", q);
  for (int d = 0; d < 4; ++d)
    LONGATTN_CHECK_VALUE(k.shape[d] == q.shape[d],
                         cat(op, ": k must have the shape of q ", shape_str(q), ", got ", shape_str(k)));
  for (int d = 0; d < 3; ++d)
    LONGATTN_CHECK_VALUE(v.shape[d] == q.shape[d], cat(op, ": v must have q's (batch, seqlen, heads) ", shape_str(q),
                                                       " and its own head_dim_v, got ", shape_str(v)));
  last_dim_contiguous(op, "q", q);
  last_dim_contiguous(op, "k", k);
  last_dim_contiguous(op, "v", v);
  LONGATTN_CHECK_VALUE(q.shape[3] >= 1 && v.shape[3] >= 1,
                       cat(op, ": head dims must be >= 1, got K=", q.shape[3], " V=", v.shape[3]));
  LONGATTN_CHECK_VALUE(a.chunk_size >= 1 && a.chunk_size <= 1024,
                       cat(op, ": chunk_size must be in [1, 1024], got ", a.chunk_size));
  LONGATTN_CHECK_VALUE(std::isfinite(a.scale), cat(op, ": scale must be finite, got ", a.scale));
  LONGATTN_CHECK_VALUE(a.feature_map >= 0 && a.feature_map <= 2, cat(op, ": unknown feature_map code ", a.feature_map));
  LONGATTN_CHECK_VALUE(a.causal || !a.log_decay, cat(op, ": log_decay needs causal=True"));
  if (out) {
    ndim(op, "out", *out, 4, layout);
    for (int d = 0; d < 4; ++d)
      LONGATTN_CHECK_VALUE(out->shape[d] == v.shape[d],
                           cat(op, ": out must have the shape of v ", shape_str(v), ", got ", shape_str(*out)));
    same_dtype(op, "out", *out, "q", q);
    same_device(op, "out", *out, "q", q);
    last_dim_contiguous(op, "out", *out);
    no_broadcast(op, "out", *out);
  }
  LinearAttentionParams p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out ? out->data : nullptr;
  p.dtype = q.dtype;
  p.heads = q.shape[2];
  p.head_dim = q.shape[3];
  p.head_dim_v = v.shape[3];
  p.seqlen = q.shape[1];
  p.batch = q.shape[0];
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
  if (out) copy_strides(*out, p.out_stride);
  if (a.cu_seqlens) {
    const TensorView& cu = *a.cu_seqlens;
    LONGATTN_CHECK_VALUE(q.shape[0] == 1, cat(op, ": with cu_seqlens, q, k, v must be packed as (1, total_tokens, "
                                              "heads, head_dim), got q ", shape_str(q)));
    LONGATTN_CHECK_TYPE(cu.dtype == DType::Int32, cat(op, ": cu_seqlens must be int32, got ", dtype_name(cu.dtype)));
    LONGATTN_CHECK_VALUE(cu.ndim == 1 && cu.shape[0] >= 1,
                         cat(op, ": cu_seqlens must be 1-D with num_sequences + 1 entries, got ", shape_str(cu)));
    same_device(op, "cu_seqlens", cu, "q", q);
    LONGATTN_CHECK_VALUE(cu.shape[0] <= 1 || cu.stride[0] == 1, cat(op, ": cu_seqlens must be contiguous"));
    const int64_t n = cu.shape[0] - 1;
    const int32_t* c = static_cast<const int32_t*>(cu.data);
    p.max_seqlen = a.max_seqlen;
    if (cu.device == DeviceType::CPU) {
      LONGATTN_CHECK_VALUE(c[0] == 0, cat(op, ": cu_seqlens[0] must be 0, got ", c[0]));
      p.max_seqlen = 0;
      for (int64_t i = 0; i < n; ++i) {
        LONGATTN_CHECK_VALUE(c[i + 1] >= c[i], cat(op, ": cu_seqlens must be non-decreasing, but entry ", i + 1,
                                                   " (", c[i + 1], ") < entry ", i, " (", c[i], ")"));
        p.max_seqlen = std::max<int64_t>(p.max_seqlen, c[i + 1] - c[i]);
      }
      LONGATTN_CHECK_VALUE(c[n] == q.shape[1], cat(op, ": cu_seqlens[-1] must equal the packed token count ",
                                                   q.shape[1], ", got ", c[n]));
    }
    p.cu_seqlens = c;
    p.batch = n;
  }
  const int64_t N = p.batch, H = p.heads, K = p.head_dim, V = p.head_dim_v;
  if (a.initial_state) check_state(op, "initial_state", *a.initial_state, q, {N, H, K, V});
  if (a.initial_z) {
    LONGATTN_CHECK_VALUE(a.normalize, cat(op, ": an initial normalizer z is only used with normalize=True"));
    check_state(op, "initial_state z", *a.initial_z, q, {N, H, K});
  }
  p.initial_state = a.initial_state ? a.initial_state->data : nullptr;
  p.initial_z = a.initial_z ? a.initial_z->data : nullptr;
  if (a.log_decay) {
    const TensorView& g = *a.log_decay;
    const DType cd = compute_dtype(q.dtype);
    LONGATTN_CHECK_TYPE(g.dtype == cd, cat(op, ": log_decay must be ", dtype_name(cd), " here, got ",
                                           dtype_name(g.dtype)));
    same_device(op, "log_decay", g, "q", q);
    if (g.ndim == 1) {
      LONGATTN_CHECK_VALUE(g.shape[0] == H, cat(op, ": log_decay must have shape (", H, ",) (per head) or (",
                                                q.shape[0], ", ", q.shape[1], ", ", H, ") (per token), got ",
                                                shape_str(g)));
      p.g_stride[0] = 0;
      p.g_stride[1] = 0;
      p.g_stride[2] = g.stride[0];
    } else {
      LONGATTN_CHECK_VALUE(g.ndim == 3 && g.shape[0] == q.shape[0] && g.shape[1] == q.shape[1] && g.shape[2] == H,
                           cat(op, ": log_decay must have shape (", H, ",) (per head) or (", q.shape[0], ", ",
                               q.shape[1], ", ", H, ") (per token), got ", shape_str(g)));
      copy_strides(g, p.g_stride);
    }
    if (g.device == DeviceType::CPU) {  // every value must be finite and <= 0
      const int64_t n0 = g.ndim == 1 ? 1 : g.shape[0], n1 = g.ndim == 1 ? 1 : g.shape[1];
      for (int64_t i = 0; i < n0; ++i)
        for (int64_t j = 0; j < n1; ++j)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t off = i * p.g_stride[0] + j * p.g_stride[1] + h * p.g_stride[2];
            const double x = cd == DType::Float64 ? static_cast<const double*>(g.data)[off]
                                                  : double(static_cast<const float*>(g.data)[off]);
            LONGATTN_CHECK_VALUE(x <= 0.0 && std::isfinite(x),
                                 cat(op, ": log_decay must be finite and <= 0 (a decay exp(log_decay) in (0, 1]), got ",
                                     x));
          }
    }
    p.log_decay = g.data;
  }
  p.scale = a.scale;
  p.feature_map = FeatureMap(a.feature_map);
  p.causal = a.causal;
  p.normalize = a.normalize;
  p.chunk_size = a.chunk_size;
  return p;
}

// What the CUDA kernels support beyond the checks shared with the CPU.
void check_cuda(const char* op, const LinearAttentionParams& p) {
  using namespace checks;
  LONGATTN_CHECK_TYPE(p.dtype == DType::Float16 || p.dtype == DType::BFloat16,
                      cat(op, ": the CUDA kernels support float16 and bfloat16 q, k, v only, got ",
                          dtype_name(p.dtype)));
  LONGATTN_CHECK_VALUE(p.head_dim <= 256, cat(op, ": the CUDA kernels support head_dim up to 256, got ", p.head_dim));
  const int64_t vmax = p.normalize ? 255 : 256;
  LONGATTN_CHECK_VALUE(p.head_dim_v <= vmax, cat(op, ": the CUDA kernels support head_dim_v up to ", vmax,
                                                  p.normalize ? " with normalize=True" : "", ", got ", p.head_dim_v));
  // Grids: heads on y (at most 65535); sequences x value tiles (up to 8) on x (at most
  // 2^31 - 1); kernels index tokens in int.
  LONGATTN_CHECK_VALUE(p.heads <= 65535, cat(op, ": the CUDA kernels support up to 65535 heads, got ", p.heads));
  LONGATTN_CHECK_VALUE(p.seqlen <= 0x7fffffff,
                       cat(op, ": the CUDA kernels support up to 2^31 - 1 tokens per call, got ", p.seqlen));
  LONGATTN_CHECK_VALUE(p.batch <= (int64_t(1) << 28),
                       cat(op, ": the CUDA kernels support up to 2^28 sequences per call, got ", p.batch));
}

void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* out,
             const TensorView* final_state, const TensorView* final_z, const LinearArgs& a, uintptr_t stream) {
  const char* op = a.cu_seqlens ? "linear_attention (varlen)" : "linear_attention";
  LinearAttentionParams p = make_params(op, q, k, v, out, a);
  const int64_t N = p.batch, H = p.heads, K = p.head_dim, V = p.head_dim_v;
  if (final_state) {
    check_state(op, "final_state", *final_state, q, {N, H, K, V});
    checks::no_broadcast(op, "final_state", *final_state);
  }
  if (final_z) {
    LONGATTN_CHECK_VALUE(a.normalize, checks::cat(op, ": a final normalizer z is only produced with normalize=True"));
    check_state(op, "final_state z", *final_z, q, {N, H, K});
  }
  p.final_state = final_state ? final_state->data : nullptr;
  p.final_z = final_z ? final_z->data : nullptr;
  if (q.device == DeviceType::CUDA) check_cuda(op, p);
  if (N * H == 0) return;
  NvtxRange range(op);
  run_on_backend(
      "linear_attention_forward", q, stream, [&] { cpu::linear_attention_forward(p); },
      LONGATTN_CUDA_FN(cuda::linear_attention_forward(p, s)));
}

void backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& dout,
              const TensorView* d_final_state, const TensorView* d_final_z, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const TensorView* d_initial_state, const TensorView* d_initial_z,
              const TensorView* d_log_decay, const TensorView* workspace, const LinearArgs& a, uintptr_t stream) {
  using namespace checks;
  const char* op = a.cu_seqlens ? "linear_attention (varlen) backward" : "linear_attention backward";
  LinearAttentionGradParams g;
  g.fwd = make_params(op, q, k, v, nullptr, a);
  const LinearAttentionParams& p = g.fwd;
  const int64_t N = p.batch, H = p.heads, K = p.head_dim, V = p.head_dim_v;
  grad_like(op, "dout", dout, v, "v", q);
  grad_like(op, "dq", dq, q, "q", q);
  grad_like(op, "dk", dk, k, "k", q);
  grad_like(op, "dv", dv, v, "v", q);
  no_broadcast(op, "dq", dq);
  no_broadcast(op, "dk", dk);
  no_broadcast(op, "dv", dv);
  if (d_final_state) check_state(op, "d_final_state", *d_final_state, q, {N, H, K, V});
  if (d_final_z) check_state(op, "d_final_z", *d_final_z, q, {N, H, K});
  if (d_initial_state) check_state(op, "d_initial_state", *d_initial_state, q, {N, H, K, V});
  if (d_initial_z) check_state(op, "d_initial_z", *d_initial_z, q, {N, H, K});
  if (d_log_decay) {
    LONGATTN_CHECK_VALUE(p.log_decay != nullptr, cat(op, ": d_log_decay needs log_decay"));
    check_state(op, "d_log_decay", *d_log_decay, q, {q.shape[0], q.shape[1], H});
    copy_strides(*d_log_decay, g.dg_stride);
    g.d_log_decay = d_log_decay->data;
  }
  g.dout = dout.data;
  copy_strides(dout, g.dout_stride);
  g.dq = dq.data;
  g.dk = dk.data;
  g.dv = dv.data;
  copy_strides(dq, g.dq_stride);
  copy_strides(dk, g.dk_stride);
  copy_strides(dv, g.dv_stride);
  g.d_final_state = d_final_state ? d_final_state->data : nullptr;
  g.d_final_z = p.normalize && d_final_z ? d_final_z->data : nullptr;
  g.d_initial_state = d_initial_state ? d_initial_state->data : nullptr;
  g.d_initial_z = p.normalize && d_initial_z ? d_initial_z->data : nullptr;
  if (q.device == DeviceType::CUDA) {
    check_cuda(op, p);
    LONGATTN_CHECK_VALUE(workspace != nullptr, cat(op, ": the CUDA backward needs a workspace"));
    same_device(op, "workspace", *workspace, "q", q);
    LONGATTN_CHECK_VALUE(contiguous(*workspace), cat(op, ": workspace must be contiguous"));
    g.workspace = workspace->data;
    g.workspace_bytes = workspace->numel() * dtype_size(workspace->dtype);
    LONGATTN_CHECK_VALUE((reinterpret_cast<uintptr_t>(g.workspace) & 255u) == 0,
                         cat(op, ": workspace must be 256-byte aligned"));
  }
  if (N * H == 0) return;
  NvtxRange range(op);
  run_on_backend(
      "linear_attention_backward", q, stream, [&] { cpu::linear_attention_backward(g); },
      LONGATTN_CUDA_FN(cuda::linear_attention_backward(g, s)));
}

// Bytes of CUDA backward workspace for these shapes (0 without the CUDA backend).
int64_t backward_workspace_bytes(const TensorView& q, const TensorView& v, const TensorView* cu_seqlens,
                                 bool normalize, bool needs_final_state) {
  LinearAttentionGradParams g;
  g.fwd.batch = cu_seqlens ? cu_seqlens->shape[0] - 1 : q.shape[0];
  g.fwd.cu_seqlens = cu_seqlens ? static_cast<const int32_t*>(cu_seqlens->data) : nullptr;
  g.fwd.seqlen = q.shape[1];
  g.fwd.heads = q.shape[2];
  g.fwd.head_dim = q.shape[3];
  g.fwd.head_dim_v = v.shape[3];
  g.fwd.normalize = normalize;
  static float dummy;
  if (needs_final_state) {
    g.d_log_decay = &dummy;
    g.d_final_state = &dummy;
  }
#if defined(LONGATTN_WITH_CUDA)
  return cuda::linear_attention_backward_workspace(g);
#else
  return 0;
#endif
}

}  // namespace

void register_linear_attention(py::module_& m) {
  auto args = [](const TensorView* s0, const TensorView* z0, const TensorView* g, const TensorView* cu, double scale,
                 int fmap, bool causal, bool normalize, int64_t chunk) {
    return LinearArgs{s0, z0, g, cu, scale, fmap, causal, normalize, chunk};
  };
  m.def(
      "linear_attention_forward",
      [args](const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* out,
             const TensorView* initial_state, const TensorView* initial_z, const TensorView* final_state,
             const TensorView* final_z, const TensorView* log_decay, const TensorView* cu_seqlens, double scale,
             int feature_map, bool causal, bool normalize, int64_t chunk_size, uintptr_t stream,
             int64_t max_seqlen) {
        LinearArgs a = args(initial_state, initial_z, log_decay, cu_seqlens, scale, feature_map, causal, normalize,
                            chunk_size);
        a.max_seqlen = max_seqlen;
        forward(q, k, v, out, final_state, final_z, a, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out").none(true), py::arg("initial_state").none(true),
      py::arg("initial_z").none(true), py::arg("final_state").none(true), py::arg("final_z").none(true),
      py::arg("log_decay").none(true), py::arg("cu_seqlens").none(true), py::arg("scale"), py::arg("feature_map"),
      py::arg("causal"), py::arg("normalize"), py::arg("chunk_size"), py::arg("stream") = uintptr_t(0),
      py::arg("max_seqlen") = int64_t(0));
  // linear_attention_forward on torch CPU tensors (decoding steps), described here rather
  // than in Python (torch_view.h). States and decays: the compute dtype (float32 or
  // float64); cu_seqlens int32.
  m.def(
      "linear_attention_forward_torch_cpu",
      [args](py::handle q, py::handle k, py::handle v, py::handle out, py::handle initial_state,
             py::handle initial_z, py::handle final_state, py::handle final_z, py::handle log_decay,
             py::handle cu_seqlens, double scale, int feature_map, bool causal, bool normalize, int64_t chunk_size) {
        const char* op = cu_seqlens.is_none() ? "linear_attention" : "linear_attention (varlen)";
        const TensorView qv = torch_cpu_float_view(q, op, "q"), kv = torch_cpu_float_view(k, op, "k"),
                         vv = torch_cpu_float_view(v, op, "v"), ov = torch_cpu_float_view(out, op, "out");
        const char* fp = "float32 or float64";
        TensorView s0, z0, s1, z1, g, cu;
        const bool has_s0 = torch_cpu_view_opt(initial_state, op, "initial_state", DType::Float32, DType::Float64, fp, s0);
        const bool has_z0 = torch_cpu_view_opt(initial_z, op, "initial_state z", DType::Float32, DType::Float64, fp, z0);
        const bool has_s1 = torch_cpu_view_opt(final_state, op, "final_state", DType::Float32, DType::Float64, fp, s1);
        const bool has_z1 = torch_cpu_view_opt(final_z, op, "final_state z", DType::Float32, DType::Float64, fp, z1);
        const bool has_g = torch_cpu_view_opt(log_decay, op, "log_decay", DType::Float32, DType::Float64, fp, g);
        const bool has_cu = torch_cpu_view_opt(cu_seqlens, op, "cu_seqlens", DType::Int32, DType::Int32, "int32", cu);
        forward(qv, kv, vv, &ov, has_s1 ? &s1 : nullptr, has_z1 ? &z1 : nullptr,
                args(has_s0 ? &s0 : nullptr, has_z0 ? &z0 : nullptr, has_g ? &g : nullptr, has_cu ? &cu : nullptr,
                     scale, feature_map, causal, normalize, chunk_size),
                0);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("initial_state").none(true),
      py::arg("initial_z").none(true), py::arg("final_state").none(true), py::arg("final_z").none(true),
      py::arg("log_decay").none(true), py::arg("cu_seqlens").none(true), py::arg("scale"), py::arg("feature_map"),
      py::arg("causal"), py::arg("normalize"), py::arg("chunk_size"));
  m.def(
      "linear_attention_backward",
      [args](const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& dout,
             const TensorView* d_final_state, const TensorView* d_final_z, const TensorView& dq, const TensorView& dk,
             const TensorView& dv, const TensorView* d_initial_state, const TensorView* d_initial_z,
             const TensorView* d_log_decay, const TensorView* initial_state, const TensorView* initial_z,
             const TensorView* log_decay, const TensorView* cu_seqlens, double scale, int feature_map, bool causal,
             bool normalize, int64_t chunk_size, const TensorView* workspace, uintptr_t stream) {
        backward(q, k, v, dout, d_final_state, d_final_z, dq, dk, dv, d_initial_state, d_initial_z, d_log_decay,
                 workspace,
                 args(initial_state, initial_z, log_decay, cu_seqlens, scale, feature_map, causal, normalize,
                      chunk_size),
                 stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("d_final_state").none(true),
      py::arg("d_final_z").none(true), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("d_initial_state").none(true), py::arg("d_initial_z").none(true), py::arg("d_log_decay").none(true),
      py::arg("initial_state").none(true), py::arg("initial_z").none(true), py::arg("log_decay").none(true),
      py::arg("cu_seqlens").none(true), py::arg("scale"), py::arg("feature_map"), py::arg("causal"),
      py::arg("normalize"), py::arg("chunk_size"), py::arg("workspace").none(true) = nullptr,
      py::arg("stream") = uintptr_t(0));
  m.def("linear_attention_backward_workspace", &backward_workspace_bytes, py::arg("q"), py::arg("v"),
        py::arg("cu_seqlens").none(true), py::arg("normalize"), py::arg("needs_final_state"),
        "Bytes of workspace the CUDA linear attention backward needs (0 without the CUDA backend).");
}

}  // namespace longattn
