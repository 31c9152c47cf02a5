// pybind11 module longattn._C: the only code that knows about Python. It receives
// framework-free TensorViews built by python/longattn/_arrays.py (or, in the `*_torch_cpu`
// entries, plain torch CPU tensors that torch_view.h describes), checks them, fills the
// kernels' parameter structs, releases the GIL and dispatches to the CPU or CUDA backend.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <string>
#include <vector>

#include "backend.h"
#include "checks.h"
#include "longattn/attention.h"
#include "longattn/cpu_isa.h"
#include "longattn/errors.h"
#include "longattn/host_buffer.h"
#include "longattn/parallel.h"
#include "longattn/rope.h"
#include "longattn/tensor.h"
#include "nvtx.h"
#include "torch_view.h"

#if defined(LONGATTN_WITH_CUDA)
#include "longattn/cuda_runtime_info.h"
#endif

namespace py = pybind11;
using namespace longattn;

namespace longattn {
void register_linear_attention(py::module_& m);  // linear_attention_binding.cpp
}

namespace {

TensorView make_view(uintptr_t ptr, int dtype, int device, int device_id, const std::vector<int64_t>& shape,
                     const std::vector<int64_t>& strides) {
  LONGATTN_CHECK_VALUE(shape.size() == strides.size() && shape.size() <= size_t(kMaxDims),
                       "TensorView: shape and strides must have the same length (at most 8)");
  LONGATTN_CHECK_VALUE(dtype >= 0 && dtype <= int(DType::Int64), "TensorView: unknown dtype code");
  LONGATTN_CHECK_VALUE(device == 0 || device == 1, "TensorView: unknown device code");
  TensorView t;
  t.data = reinterpret_cast<void*>(ptr);
  t.dtype = DType(dtype);
  t.device = DeviceType(device);
  t.device_id = device_id;
  t.ndim = int(shape.size());
  for (int i = 0; i < t.ndim; ++i) {
    LONGATTN_CHECK_VALUE(shape[i] >= 0, "TensorView: negative size");
    t.shape[i] = shape[i];
    t.stride[i] = strides[i];
  }
  return t;
}

void rope(const TensorView& q, const TensorView& q_out, const TensorView* k, const TensorView* k_out,
          const TensorView* positions, const std::vector<float>& inv_freq, double attention_factor,
          bool interleaved, bool conjugate, uintptr_t stream) {
  const char* op = "apply_rope";
  using namespace checks;
  const bool cuda = q.device == DeviceType::CUDA;
  ndim(op, "q", q, 4, "(batch, seq, heads, head_dim)");
  float_dtype(op, "q", q, cuda);
  last_dim_contiguous(op, "q", q);
  const int64_t B = q.shape[0], S = q.shape[1], D = q.shape[3];
  const int64_t half = int64_t(inv_freq.size());
  LONGATTN_CHECK_VALUE(half >= 1 && half <= kRopeMaxHalf,
                       cat(op, ": inv_freq must have 1 to ", kRopeMaxHalf, " entries, got ", half));
  LONGATTN_CHECK_VALUE(2 * half <= D, cat(op, ": rotary dim 2*len(inv_freq) = ", 2 * half,
                                          " exceeds q's head_dim ", D));
  auto check_out = [&](const char* name, const TensorView& out, const TensorView& in) {
    ndim(op, name, out, 4, "(batch, seq, heads, head_dim)");
    for (int d = 0; d < 4; ++d)
      LONGATTN_CHECK_VALUE(out.shape[d] == in.shape[d], cat(op, ": ", name, " has shape ", shape_str(out),
                                                            ", expected ", shape_str(in)));
    same_dtype(op, name, out, "q", q);
    same_device(op, name, out, "q", q);
    last_dim_contiguous(op, name, out);
    no_broadcast(op, name, out);
  };
  // In place, the outputs are q and k themselves: name them so.
  const bool inplace = q_out.data == q.data;
  check_out(inplace ? "q" : "q_out", q_out, q);
  if (k) {
    ndim(op, "k", *k, 4, "(batch, seq, heads, head_dim)");
    dim_equals(op, "k", *k, 0, B, "batch");
    dim_equals(op, "k", *k, 1, S, "seq");
    dim_equals(op, "k", *k, 3, D, "head_dim");
    same_dtype(op, "k", *k, "q", q);
    same_device(op, "k", *k, "q", q);
    last_dim_contiguous(op, "k", *k);
    LONGATTN_CHECK_VALUE(k_out != nullptr, cat(op, ": k_out is required with k"));
    check_out(inplace ? "k" : "k_out", *k_out, *k);
  }
  RopeParams p;
  if (positions) {
    const TensorView& pv = *positions;
    LONGATTN_CHECK_TYPE(pv.dtype == DType::Int32 || pv.dtype == DType::Int64,
                        cat(op, ": positions must be int32 or int64 here, got ", dtype_name(pv.dtype)));
    same_device(op, "positions", pv, "q", q);
    if (pv.ndim == 1) {
      dim_equals(op, "positions", pv, 0, S, "seq");
      p.pos_stride[0] = 0;
      p.pos_stride[1] = pv.stride[0];
    } else {
      LONGATTN_CHECK_VALUE(pv.ndim == 2, cat(op, ": positions must have shape (seq,) or (batch, seq), got ",
                                             shape_str(pv)));
      dim_equals(op, "positions", pv, 0, B, "batch");
      dim_equals(op, "positions", pv, 1, S, "seq");
      p.pos_stride[0] = pv.stride[0];
      p.pos_stride[1] = pv.stride[1];
    }
    p.positions = pv.data;
    p.pos_dtype = pv.dtype;
  }
  p.q = q.data;
  p.q_out = q_out.data;
  p.k = k ? k->data : nullptr;
  p.k_out = k ? k_out->data : nullptr;
  p.dtype = q.dtype;
  p.batch = B;
  p.seqlen = S;
  p.hq = q.shape[2];
  p.hk = k ? k->shape[2] : 0;
  p.head_dim = D;
  p.rotary_half = half;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride[i];
    p.q_out_stride[i] = q_out.stride[i];
    p.k_stride[i] = k ? k->stride[i] : 0;
    p.k_out_stride[i] = k ? k_out->stride[i] : 0;
  }
  p.attention_factor = attention_factor;
  p.sin_sign = conjugate ? -1.f : 1.f;
  p.interleaved = interleaved;
  std::memcpy(p.inv_freq, inv_freq.data(), sizeof(float) * half);
  if (B * S == 0 || p.hq + p.hk == 0 || D == 0) return;

  NvtxRange range("apply_rope");
  run_on_backend(
      "rope_kernel", q, stream, [&] { cpu::rope(p); },
      LONGATTN_CUDA_FN(cuda::rope(p, s)));
}

// rope() on torch CPU tensors (torch_view.h); inv_freq a 1-D float32 CPU tensor.
void rope_torch_cpu(py::handle q, py::handle q_out, py::handle k, py::handle k_out, py::handle positions,
                    py::handle inv_freq, double attention_factor, bool interleaved, bool conjugate) {
  using namespace checks;
  const char* op = "apply_rope";
  const TensorView qv = torch_cpu_float_view(q, op, "q"), qo = torch_cpu_float_view(q_out, op, "q_out");
  TensorView kv, ko, pv;
  const bool has_k = !k.is_none();
  if (has_k) {
    kv = torch_cpu_float_view(k, op, "k");
    ko = torch_cpu_float_view(k_out, op, "k_out");
  }
  const bool has_pos = torch_cpu_view_opt(positions, op, "positions", DType::Int32, DType::Int64, "int32 or int64", pv);
  const TensorView f = torch_cpu_view(inv_freq, op, "inv_freq", DType::Float32, DType::Float32, "float32");
  LONGATTN_CHECK_VALUE(f.ndim == 1 && f.shape[0] >= 1 && f.shape[0] <= kRopeMaxHalf,
                       cat(op, ": inv_freq must be 1-D with 1 to ", kRopeMaxHalf, " entries, got shape ", shape_str(f)));
  std::vector<float> freqs(size_t(f.shape[0]));
  for (int64_t i = 0; i < f.shape[0]; ++i) {
    freqs[size_t(i)] = static_cast<const float*>(f.data)[i * f.stride[0]];
    LONGATTN_CHECK_VALUE(std::isfinite(freqs[size_t(i)]), cat(op, ": inv_freq must be finite"));
  }
  rope(qv, qo, has_k ? &kv : nullptr, has_k ? &ko : nullptr, has_pos ? &pv : nullptr, freqs, attention_factor,
       interleaved, conjugate, 0);
}

// ---- flash attention -------------------------------------------------------------------

// A BlockMask's lists as the kernels read them; checked against q and k at call time.
// Key side: kv_num, kv_idx, full_num, full_idx; query side (their transposes, read by the
// CUDA backward): q_num, q_idx, full_q_num, full_q_idx. Bit tiles of token-granular masks
// (absent when `bits` has no tiles): the pool and the per-slot pool indices kv_bits, q_bits.
struct BlockSparseArgs {
  TensorView kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx;
  TensorView bits, kv_bits, q_bits;
  int64_t block_q, block_k;
  bool causal;
  int64_t window_left, window_right, sink_tokens;
};

struct AttentionArgs {
  const BlockSparseArgs* sparse = nullptr;
  const TensorView* cu_seqlens_q;
  const TensorView* cu_seqlens_k;
  int64_t max_seqlen_q, max_seqlen_k;
  double scale, softcap;
  const TensorView* alibi_slopes;
  int64_t window_left, window_right;
  bool causal;
  bool deterministic = false;
};

// What the CUDA kernels support beyond the checks shared with the CPU.
void check_cuda_attention(const char* op, const AttentionParams& p) {
  using namespace checks;
  LONGATTN_CHECK_TYPE(p.dtype == DType::Float16 || p.dtype == DType::BFloat16,
                      cat(op, ": the CUDA kernels support float16 and bfloat16 only, got ", dtype_name(p.dtype),
                          "; cast q, k and v, or use CPU tensors"));
  LONGATTN_CHECK_VALUE(p.head_dim <= 256 && p.head_dim_v <= 256,
                       cat(op, ": the CUDA kernels support head dims up to 256, got head_dim=", p.head_dim,
                           ", head_dim_v=", p.head_dim_v));
  // Grids are (token blocks x batch, heads): heads on y (at most 65535), blocks of 32 or
  // more tokens times the batch on x (at most 2^31 - 1); kernels index tokens in int.
  constexpr int64_t kMaxInt = 0x7fffffff;
  LONGATTN_CHECK_VALUE(p.heads <= 65535, cat(op, ": the CUDA kernels support up to 65535 heads, got ", p.heads));
  LONGATTN_CHECK_VALUE(p.seqlen_q <= kMaxInt && p.seqlen_k <= kMaxInt,
                       cat(op, ": the CUDA kernels support sequences of up to 2^31 - 1 tokens, got seqlen_q=",
                           p.seqlen_q, ", seqlen_k=", p.seqlen_k));
  const int64_t blocks = (std::max(p.seqlen_q, p.seqlen_k) + 31) / 32;
  LONGATTN_CHECK_VALUE(blocks * p.batch <= kMaxInt,
                       cat(op, ": batch x ceil(longest sequence / 32) must be at most 2^31 - 1 on CUDA (the grid "
                               "size), got batch=", p.batch, " with seqlen_q=", p.seqlen_q, ", seqlen_k=", p.seqlen_k,
                           "; split the batch"));
}

void check_cu_seqlens(const char* op, const char* name, const TensorView& cu, int64_t batch, int64_t total) {
  using namespace checks;
  LONGATTN_CHECK_TYPE(cu.dtype == DType::Int32, cat(op, ": ", name, " must be int32, got ", dtype_name(cu.dtype)));
  LONGATTN_CHECK_VALUE(cu.ndim == 1 && cu.shape[0] == batch + 1,
                       cat(op, ": ", name, " must have shape (", batch + 1, ",), got ", shape_str(cu)));
  if (cu.device != DeviceType::CPU) return;  // device values are validated by the Python layer on a host copy
  const int32_t* c = static_cast<const int32_t*>(cu.data);
  LONGATTN_CHECK_VALUE(batch + 1 == 0 || c[0] == 0, cat(op, ": ", name, "[0] must be 0, got ", c[0]));
  for (int64_t i = 0; i < batch; ++i)
    LONGATTN_CHECK_VALUE(c[(i + 1) * cu.stride[0]] >= c[i * cu.stride[0]],
                         cat(op, ": ", name, " must be non-decreasing, but entry ", i + 1, " < entry ", i));
  LONGATTN_CHECK_VALUE(c[batch * cu.stride[0]] == total,
                       cat(op, ": ", name, "[-1] must equal the packed token count ", total, ", got ",
                           c[batch * cu.stride[0]]));
}

// Checks q, k, v (and out/lse when given) and fills the kernel parameters.
AttentionParams attention_params(const char* op, const TensorView& q, const TensorView& k, const TensorView& v,
                                 const TensorView& out, const TensorView* lse, const AttentionArgs& a) {
  using namespace checks;
  const bool varlen = a.cu_seqlens_q != nullptr;
  LONGATTN_CHECK_VALUE(varlen == (a.cu_seqlens_k != nullptr), cat(op, ": pass both cu_seqlens_q and cu_seqlens_k"));
  const int nd = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  const bool cuda = q.device == DeviceType::CUDA;
  ndim(op, "q", q, nd, layout);
  ndim(op, "k", k, nd, layout);
  ndim(op, "v", v, nd, layout);
  float_dtype(op, "q", q, cuda);
  same_dtype(op, "k", k, "q", q);
  same_dtype(op, "v", v, "q", q);
  same_device(op, "k", k, "q", q);
  same_device(op, "v", v, "q", q);
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"q", &q}, {"k", &k}, {"v", &v}})
    last_dim_contiguous(op, name, *t);
  const int h = nd - 2;  // heads dim
  const int64_t H = q.shape[h], Hkv = k.shape[h], D = q.shape[h + 1], Dv = v.shape[h + 1];
  if (!varlen) dim_equals(op, "k", k, 0, q.shape[0], "batch");
  dim_equals(op, "k", k, h + 1, D, "head_dim (q's)");
  dim_equals(op, "v", v, 0, k.shape[0], varlen ? "total_tokens (k's)" : "batch (k's)");
  if (!varlen) dim_equals(op, "v", v, 1, k.shape[1], "seqlen (k's)");
  dim_equals(op, "v", v, h, Hkv, "heads (k's)");
  LONGATTN_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0,
                       cat(op, ": q's heads (", H, ") must be a multiple of k's heads (", Hkv, ")"));
  LONGATTN_CHECK_VALUE(D >= 1 && Dv >= 1, cat(op, ": head dims must be >= 1, got D=", D, " Dv=", Dv));
  LONGATTN_CHECK_VALUE(a.window_left >= -1 && a.window_right >= -1,
                       cat(op, ": window entries must be >= -1, got (", a.window_left, ", ", a.window_right, ")"));
  LONGATTN_CHECK_VALUE(std::isfinite(a.softcap) && a.softcap >= 0,
                       cat(op, ": softcap must be >= 0 and finite, got ", a.softcap));
  LONGATTN_CHECK_VALUE(std::isfinite(a.scale), cat(op, ": softmax_scale must be finite, got ", a.scale));
  // out: same layout as q with Dv; written, so no broadcast dims.
  ndim(op, "out", out, nd, layout);
  for (int d = 0; d < nd - 1; ++d)
    LONGATTN_CHECK_VALUE(out.shape[d] == q.shape[d], cat(op, ": out has shape ", shape_str(out), ", q ", shape_str(q)));
  dim_equals(op, "out", out, nd - 1, Dv, "head_dim_v");
  same_dtype(op, "out", out, "q", q);
  same_device(op, "out", out, "q", q);
  last_dim_contiguous(op, "out", out);

  AttentionParams p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.dtype = q.dtype;
  p.heads = H;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.head_dim_v = Dv;
  auto strides3 = [&](const TensorView& t, int64_t* s) {
    if (varlen) {
      s[0] = 0;
      s[1] = t.stride[0];
      s[2] = t.stride[1];
    } else {
      s[0] = t.stride[0];
      s[1] = t.stride[1];
      s[2] = t.stride[2];
    }
  };
  strides3(q, p.q_stride);
  strides3(k, p.k_stride);
  strides3(v, p.v_stride);
  strides3(out, p.out_stride);
  if (varlen) {
    const int64_t batch = a.cu_seqlens_q->ndim == 1 ? a.cu_seqlens_q->shape[0] - 1 : -1;
    LONGATTN_CHECK_VALUE(batch >= 0, cat(op, ": cu_seqlens_q must be 1-D with batch + 1 entries"));
    check_cu_seqlens(op, "cu_seqlens_q", *a.cu_seqlens_q, batch, q.shape[0]);
    check_cu_seqlens(op, "cu_seqlens_k", *a.cu_seqlens_k, batch, k.shape[0]);
    same_device(op, "cu_seqlens_q", *a.cu_seqlens_q, "q", q);
    same_device(op, "cu_seqlens_k", *a.cu_seqlens_k, "q", q);
    LONGATTN_CHECK_VALUE(a.cu_seqlens_q->stride[0] == 1 && a.cu_seqlens_k->stride[0] == 1,
                         cat(op, ": cu_seqlens_q and cu_seqlens_k must be contiguous"));
    p.batch = batch;
    p.cu_seqlens_q = static_cast<const int32_t*>(a.cu_seqlens_q->data);
    p.cu_seqlens_k = static_cast<const int32_t*>(a.cu_seqlens_k->data);
    p.seqlen_q = a.max_seqlen_q;
    p.seqlen_k = a.max_seqlen_k;
    if (q.device == DeviceType::CPU) {  // the true maxima, so no sequence is skipped
      p.seqlen_q = p.seqlen_k = 0;
      for (int64_t b = 0; b < batch; ++b) {
        p.seqlen_q = std::max<int64_t>(p.seqlen_q, p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
        p.seqlen_k = std::max<int64_t>(p.seqlen_k, p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
      }
    }
  } else {
    p.batch = q.shape[0];
    p.seqlen_q = q.shape[1];
    p.seqlen_k = k.shape[1];
  }
  p.total_q = varlen ? q.shape[0] : p.batch * p.seqlen_q;
  if (lse) {
    LONGATTN_CHECK_TYPE(lse->dtype == DType::Float32, cat(op, ": lse must be float32, got ", dtype_name(lse->dtype)));
    same_device(op, "lse", *lse, "q", q);
    if (varlen) {
      LONGATTN_CHECK_VALUE(lse->ndim == 2 && lse->shape[0] == H && lse->shape[1] == q.shape[0],
                           cat(op, ": lse must have shape (", H, ", ", q.shape[0], "), got ", shape_str(*lse)));
      p.lse_stride[0] = 0;
      p.lse_stride[1] = lse->stride[0];
      p.lse_stride[2] = lse->stride[1];
    } else {
      LONGATTN_CHECK_VALUE(lse->ndim == 3 && lse->shape[0] == p.batch && lse->shape[1] == H &&
                               lse->shape[2] == p.seqlen_q,
                           cat(op, ": lse must have shape (", p.batch, ", ", H, ", ", p.seqlen_q, "), got ",
                               shape_str(*lse)));
      p.lse_stride[0] = lse->stride[0];
      p.lse_stride[1] = lse->stride[1];
      p.lse_stride[2] = lse->stride[2];
    }
    p.lse = static_cast<float*>(lse->data);
  }
  if (a.alibi_slopes) {
    const TensorView& al = *a.alibi_slopes;
    LONGATTN_CHECK_TYPE(al.dtype == DType::Float32,
                        cat(op, ": alibi_slopes must be float32, got ", dtype_name(al.dtype)));
    same_device(op, "alibi_slopes", al, "q", q);
    const bool ok = (al.ndim == 1 && al.shape[0] == H) || (al.ndim == 2 && al.shape[0] == p.batch && al.shape[1] == H);
    LONGATTN_CHECK_VALUE(ok, cat(op, ": alibi_slopes must have shape (", H, ",) or (", p.batch, ", ", H, "), got ",
                                 shape_str(al)));
    LONGATTN_CHECK_VALUE(al.shape[al.ndim - 1] <= 1 || al.stride[al.ndim - 1] == 1,
                         cat(op, ": alibi_slopes must be contiguous in its last dim"));
    p.alibi_slopes = static_cast<const float*>(al.data);
    p.alibi_batch_stride = al.ndim == 2 ? al.stride[0] : 0;
  }
  p.scale = a.scale;
  p.softcap = a.softcap;
  p.window_left = a.window_left;
  p.window_right = a.causal ? 0 : a.window_right;  // causal: nothing right of the diagonal
  return p;
}

// Bit tiles of a token-granular BlockMask: pool (num_bits, block_q, ceil(block_k / 32))
// int32, contiguous; kv_bits / q_bits with the shapes and strides of kv_idx / q_idx. Host
// pool indices are checked for every used slot; device ones are clamped by the kernels.
template <typename BStride>
void block_sparse_bits(const char* op, const BlockSparseArgs& m, const TensorView& q, int64_t nqb, int64_t nkb,
                       const BStride& bstride, BlockSparseSchedule& bs) {
  using namespace checks;
  if (m.bits.ndim != 3 || m.bits.shape[0] == 0) return;  // no bit tiles
  const int64_t words = (m.block_k + 31) / 32, tiles = m.bits.shape[0];
  LONGATTN_CHECK_TYPE(m.bits.dtype == DType::Int32 && m.kv_bits.dtype == DType::Int32 && m.q_bits.dtype == DType::Int32,
                      cat(op, ": block_mask.partial_bits, kv_bits_index and q_bits_index must be int32"));
  same_device(op, "block_mask.partial_bits", m.bits, "q", q);
  same_device(op, "block_mask.kv_bits_index", m.kv_bits, "q", q);
  same_device(op, "block_mask.q_bits_index", m.q_bits, "q", q);
  LONGATTN_CHECK_VALUE(m.bits.shape[1] == m.block_q && m.bits.shape[2] == words && m.bits.stride[2] == 1 &&
                           m.bits.stride[1] == words && m.bits.stride[0] == m.block_q * words,
                       cat(op, ": block_mask.partial_bits must be a contiguous (num_tiles, ", m.block_q, ", ", words,
                           ") array, got shape ", shape_str(m.bits)));
  const TensorView* ids[2] = {&m.kv_bits, &m.q_bits};
  const TensorView* idxs[2] = {&m.kv_idx, &m.q_idx};
  const TensorView* nums[2] = {&m.kv_num, &m.q_num};
  const char* names[2] = {"block_mask.kv_bits_index", "block_mask.q_bits_index"};
  for (int l = 0; l < 2; ++l) {
    const TensorView &id = *ids[l], &x = *idxs[l], &n = *nums[l];
    bool same = id.ndim == 4;
    for (int d = 0; same && d < 4; ++d) same = id.shape[d] == x.shape[d] && (d == 3 || bstride(id, d) == bstride(x, d));
    LONGATTN_CHECK_VALUE(same && (id.shape[3] <= 1 || id.stride[3] == 1),
                         cat(op, ": ", names[l], " must have the shape and strides of its index list, got shape ",
                             shape_str(id)));
    if (id.device != DeviceType::CPU) continue;
    const int64_t rows = l ? nkb : nqb;
    const int32_t* nd = static_cast<const int32_t*>(n.data);
    const int32_t* idd = static_cast<const int32_t*>(id.data);
    for (int64_t b = 0; b < n.shape[0]; ++b)
      for (int64_t h = 0; h < n.shape[1]; ++h)
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t c = nd[b * n.stride[0] + h * n.stride[1] + r * n.stride[2]];
          const int32_t* row = idd + b * id.stride[0] + h * id.stride[1] + r * id.stride[2];
          for (int32_t i = 0; i < c; ++i)
            LONGATTN_CHECK_VALUE(row[i] >= 0 && row[i] < tiles,
                                 cat(op, ": ", names[l], " holds ", row[i], ", outside [0, ", tiles, ")"));
        }
  }
  bs.bits = static_cast<const int32_t*>(m.bits.data);
  bs.num_bits = tiles;
  bs.bits_words = words;
  bs.kv_bits = static_cast<const int32_t*>(m.kv_bits.data);
  bs.q_bits = static_cast<const int32_t*>(m.q_bits.data);
}

// Checks a BlockMask's lists against q/k and fills `bs`. Shapes, dtypes and devices are
// always checked. Lists in host memory also have every count and index checked (counts in
// [0, n], indices in [0, n) and strictly increasing within the count), after which the CPU
// kernel reads them without bounds checks. Lists in device memory cannot be read here
// without a synchronizing copy: their contents were validated when the BlockMask was
// constructed (every constructor path, .to(device) included), and the CUDA kernels clamp
// counts and indices to the list shapes, so they never read out of bounds.
void block_sparse_schedule(const char* op, const BlockSparseArgs& m, const TensorView& q, const AttentionParams& p,
                           BlockSparseSchedule& bs) {
  using namespace checks;
  const bool cuda = q.device == DeviceType::CUDA;
  LONGATTN_CHECK_VALUE(m.block_q >= 1 && m.block_k >= 1, cat(op, ": block_mask block sizes must be positive"));
  if (cuda)  // a 64-row query tile and a key tile of the kernels must lie inside one block
    LONGATTN_CHECK_VALUE((m.block_q == 64 || m.block_q == 128) && (m.block_k == 64 || m.block_k == 128),
                         cat(op, ": block_mask.block_size must be 64 or 128 in each dim on CUDA, got (", m.block_q,
                             ", ", m.block_k, "); build the mask with block_size=64 or 128"));
  const int64_t nqb = (p.seqlen_q + m.block_q - 1) / m.block_q, nkb = (p.seqlen_k + m.block_k - 1) / m.block_k;
  const TensorView* nums[4] = {&m.kv_num, &m.full_num, &m.q_num, &m.full_q_num};
  const TensorView* idxs[4] = {&m.kv_idx, &m.full_idx, &m.q_idx, &m.full_q_idx};
  const char* num_names[4] = {"block_mask.kv_num_blocks", "block_mask.full_kv_num_blocks", "block_mask.q_num_blocks",
                              "block_mask.full_q_num_blocks"};
  const char* idx_names[4] = {"block_mask.kv_indices", "block_mask.full_kv_indices", "block_mask.q_indices",
                              "block_mask.full_q_indices"};
  for (int l = 0; l < 4; ++l) {
    const TensorView& n = *nums[l];
    const TensorView& x = *idxs[l];
    const bool q_side = l >= 2;
    const int64_t rows = q_side ? nkb : nqb, slots = q_side ? nqb : nkb;
    LONGATTN_CHECK_TYPE(n.dtype == DType::Int32 && x.dtype == DType::Int32,
                        cat(op, ": ", num_names[l], " and ", idx_names[l], " must be int32"));
    same_device(op, num_names[l], n, "q", q);
    same_device(op, idx_names[l], x, "q", q);
    LONGATTN_CHECK_VALUE(n.ndim == 3 && x.ndim == 4,
                         cat(op, ": ", num_names[l], " must be (B|1, H|1, ", q_side ? "nKb" : "nQb", ") and ",
                             idx_names[l], " (B|1, H|1, ", q_side ? "nKb, nQb" : "nQb, nKb", ")"));
    LONGATTN_CHECK_VALUE((n.shape[0] == 1 || n.shape[0] == p.batch) && (n.shape[1] == 1 || n.shape[1] == p.heads) &&
                             n.shape[2] == rows,
                         cat(op, ": ", num_names[l], " has shape ", shape_str(n), " but q and k need (", p.batch,
                             "|1, ", p.heads, "|1, ", rows, ") for block_size (", m.block_q, ", ", m.block_k, ")"));
    for (int d = 0; d < 3; ++d)
      LONGATTN_CHECK_VALUE(x.shape[d] == n.shape[d], cat(op, ": ", idx_names[l], " and ", num_names[l], " disagree"));
    LONGATTN_CHECK_VALUE(x.shape[3] == slots, cat(op, ": ", idx_names[l], " has ", x.shape[3], " slots, q and k need ",
                                                  slots, " for block_size (", m.block_q, ", ", m.block_k, ")"));
    LONGATTN_CHECK_VALUE(x.shape[3] <= 1 || x.stride[3] == 1, cat(op, ": ", idx_names[l], " must be contiguous"));
    LONGATTN_CHECK_VALUE(n.shape[0] == m.kv_num.shape[0] && n.shape[1] == m.kv_num.shape[1],
                         cat(op, ": the block_mask lists must share their batch and head dims"));
    if (n.device != DeviceType::CPU) continue;
    const int32_t* nd = static_cast<const int32_t*>(n.data);
    const int32_t* xd = static_cast<const int32_t*>(x.data);
    for (int64_t b = 0; b < n.shape[0]; ++b)
      for (int64_t h = 0; h < n.shape[1]; ++h)
        for (int64_t r = 0; r < rows; ++r) {
          const int32_t c = nd[b * n.stride[0] + h * n.stride[1] + r * n.stride[2]];
          LONGATTN_CHECK_VALUE(c >= 0 && c <= slots,
                               cat(op, ": ", num_names[l], " holds ", c, ", outside [0, ", slots, "]"));
          const int32_t* row = xd + b * x.stride[0] + h * x.stride[1] + r * x.stride[2];
          for (int32_t i = 0; i < c; ++i)
            LONGATTN_CHECK_VALUE(row[i] >= 0 && row[i] < slots && (i == 0 || row[i] > row[i - 1]),
                                 cat(op, ": ", idx_names[l], " must hold sorted indices in [0, ", slots, ")"));
        }
  }
  auto bstride = [&](const TensorView& t, int d) { return t.shape[d] == 1 ? int64_t(0) : t.stride[d]; };
  for (int side = 0; side < 2; ++side) {
    const TensorView &n0 = *nums[2 * side], &n1 = *nums[2 * side + 1], &x0 = *idxs[2 * side], &x1 = *idxs[2 * side + 1];
    bool same = true;
    for (int d = 0; d < 3; ++d) same = same && bstride(n0, d) == bstride(n1, d) && bstride(x0, d) == bstride(x1, d);
    LONGATTN_CHECK_VALUE(same, cat(op, ": the partial and full lists of block_mask must share shapes and strides"));
  }
  bs.kv_num = static_cast<const int32_t*>(m.kv_num.data);
  bs.kv_idx = static_cast<const int32_t*>(m.kv_idx.data);
  bs.full_num = static_cast<const int32_t*>(m.full_num.data);
  bs.full_idx = static_cast<const int32_t*>(m.full_idx.data);
  bs.q_num = static_cast<const int32_t*>(m.q_num.data);
  bs.q_idx = static_cast<const int32_t*>(m.q_idx.data);
  bs.full_q_num = static_cast<const int32_t*>(m.full_q_num.data);
  bs.full_q_idx = static_cast<const int32_t*>(m.full_q_idx.data);
  for (int d = 0; d < 3; ++d) {
    bs.num_stride[d] = bstride(m.kv_num, d);
    bs.idx_stride[d] = bstride(m.kv_idx, d);
    bs.q_num_stride[d] = bstride(m.q_num, d);
    bs.q_idx_stride[d] = bstride(m.q_idx, d);
  }
  block_sparse_bits(op, m, q, nqb, nkb, bstride, bs);
  bs.num_q_blocks = nqb;
  bs.num_k_blocks = nkb;
  bs.block_q = m.block_q;
  bs.block_k = m.block_k;
  bs.causal = m.causal;
  bs.window_left = m.window_left;
  bs.window_right = m.window_right;
  bs.sink_tokens = m.sink_tokens;
}

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const TensorView* lse, const AttentionArgs& a, uintptr_t stream) {
  const char* op = a.sparse ? "block_sparse_attention" : a.cu_seqlens_q ? "flash_attention_varlen" : "flash_attention";
  AttentionParams p = attention_params(op, q, k, v, out, lse, a);
  // The CPU kernels write the lse only where asked (the eager torch path without return_lse).
  LONGATTN_CHECK_VALUE(lse != nullptr || q.device == DeviceType::CPU, checks::cat(op, ": lse is required"));
  BlockSparseSchedule bs;
  if (a.sparse) {
    LONGATTN_CHECK_VALUE(!a.cu_seqlens_q, checks::cat(op, ": block-sparse attention takes dense batches"));
    block_sparse_schedule(op, *a.sparse, q, p, bs);
    p.sparse = &bs;
  }
  if (p.batch == 0 || p.heads == 0) return;
  NvtxRange range(op);
  if (q.device == DeviceType::CUDA) check_cuda_attention(op, p);
  run_on_backend(
      "flash_attention_forward", q, stream, [&] { cpu::attention_forward(p); },
      LONGATTN_CUDA_FN(cuda::attention_forward(p, s)));
}

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                        const TensorView& lse, const TensorView& dout, const TensorView* dlse, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv, const TensorView* dq_accum,
                        const TensorView* delta, const AttentionArgs& a, uintptr_t stream) {
  using namespace checks;
  const char* op = a.sparse         ? "block_sparse_attention backward"
                   : a.cu_seqlens_q ? "flash_attention_varlen backward"
                                    : "flash_attention backward";
  AttentionGradParams g;
  g.fwd = attention_params(op, q, k, v, out, &lse, a);
  BlockSparseSchedule bs;
  if (a.sparse) {
    LONGATTN_CHECK_VALUE(!a.cu_seqlens_q, checks::cat(op, ": block-sparse attention takes dense batches"));
    block_sparse_schedule(op, *a.sparse, q, g.fwd, bs);
    g.fwd.sparse = &bs;
  }
  grad_like(op, "dout", dout, out, "out", q);
  grad_like(op, "dq", dq, q, "q", q);
  grad_like(op, "dk", dk, k, "k", q);
  grad_like(op, "dv", dv, v, "v", q);
  no_broadcast(op, "dq", dq);
  no_broadcast(op, "dk", dk);
  no_broadcast(op, "dv", dv);
  const bool varlen = a.cu_seqlens_q != nullptr;
  auto strides3 = [&](const TensorView& t, int64_t* s) {
    s[0] = varlen ? 0 : t.stride[0];
    s[1] = t.stride[varlen ? 0 : 1];
    s[2] = t.stride[varlen ? 1 : 2];
  };
  if (dlse) {
    LONGATTN_CHECK_TYPE(dlse->dtype == DType::Float32, cat(op, ": dlse must be float32"));
    same_device(op, "dlse", *dlse, "q", q);
    LONGATTN_CHECK_VALUE(dlse->ndim == lse.ndim, cat(op, ": dlse must have the shape of lse"));
    for (int d = 0; d < lse.ndim; ++d)
      LONGATTN_CHECK_VALUE(dlse->shape[d] == lse.shape[d] && (lse.numel() == 0 || dlse->stride[d] == lse.stride[d]),
                           cat(op, ": dlse must have the shape and strides of lse"));
    g.dlse = static_cast<const float*>(dlse->data);
  }
  g.dout = dout.data;
  g.dq = dq.data;
  g.dk = dk.data;
  g.dv = dv.data;
  strides3(dout, g.dout_stride);
  strides3(dq, g.dq_stride);
  strides3(dk, g.dk_stride);
  strides3(dv, g.dv_stride);
  if (g.fwd.batch == 0 || g.fwd.heads == 0) return;
  NvtxRange range(op);
  g.deterministic = a.deterministic;
  if (q.device == DeviceType::CUDA) {
    check_cuda_attention(op, g.fwd);
    // float32 workspaces from the caller: dq_accum like q (contiguous), delta like a contiguous lse.
    LONGATTN_CHECK_VALUE(delta != nullptr && (a.deterministic || dq_accum != nullptr),
                         cat(op, ": the CUDA backward needs the float32 workspaces delta and dq_accum"));
    auto workspace = [&](const char* name, const TensorView& t, const TensorView& like) {
      LONGATTN_CHECK_TYPE(t.dtype == DType::Float32, cat(op, ": ", name, " must be float32"));
      same_device(op, name, t, "q", q);
      LONGATTN_CHECK_VALUE(t.ndim == like.ndim, cat(op, ": ", name, " must have shape ", shape_str(like)));
      int64_t expect = 1;
      for (int d = t.ndim - 1; d >= 0; --d) {
        LONGATTN_CHECK_VALUE(t.shape[d] == like.shape[d] && (t.shape[d] <= 1 || t.stride[d] == expect),
                             cat(op, ": ", name, " must be contiguous with shape ", shape_str(like), ", got ",
                                 shape_str(t)));
        expect *= t.shape[d];
      }
    };
    workspace("delta", *delta, lse);
    g.delta = static_cast<float*>(delta->data);
    // delta is indexed (batch, head, token) like lse: dense (B, H, Sq), varlen (H, total_q).
    g.delta_stride[0] = varlen ? 0 : delta->shape[1] * delta->shape[2];
    g.delta_stride[1] = varlen ? delta->shape[1] : delta->shape[2];
    g.delta_stride[2] = 1;
    if (dq_accum) {
      workspace("dq_accum", *dq_accum, q);
      g.dq_accum = static_cast<float*>(dq_accum->data);
      const int64_t hd = q.shape[q.ndim - 2] * q.shape[q.ndim - 1];  // heads * head_dim
      g.dq_accum_stride[0] = varlen ? 0 : q.shape[1] * hd;
      g.dq_accum_stride[1] = hd;
      g.dq_accum_stride[2] = q.shape[q.ndim - 1];
    }
  }
  run_on_backend(
      "flash_attention_backward", q, stream, [&] { cpu::attention_backward(g); },
      LONGATTN_CUDA_FN(cuda::attention_backward(g, s)));
}

py::dict build_info() {
  py::dict d;
  d["cpu_isa"] = cpu_isa_name(cpu_isa());
  d["cpu_bf16_dot"] = cpu_bf16_dot();
  d["num_threads"] = num_threads();
  d["cpu_cache_limit"] = host_cache_limit();
#if defined(LONGATTN_WITH_CUDA)
  d["cuda_compiled"] = true;
  d["cuda_archs"] = std::string(LONGATTN_CUDA_ARCHS);
  d["flash_fwd_strips"] = LONGATTN_FWD_STRIPS;
  d["sparse_fwd_2strip_dp"] = LONGATTN_SPARSE_FWD_2STRIP_DP;
  d["cuda_device_count"] = cuda::device_count();
  d["cuda_devices"] = cuda::device_names();
  int v = cuda::runtime_version();
  d["cuda_runtime_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = std::string();
  d["flash_fwd_strips"] = py::none();
  d["sparse_fwd_2strip_dp"] = py::none();
  d["cuda_device_count"] = 0;
  d["cuda_devices"] = std::vector<std::string>();
  d["cuda_runtime_version"] = py::none();
#endif
  d["nvtx"] = bool(LONGATTN_HAVE_NVTX);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longattn compiled kernels (CPU and CUDA); use the longattn package, not this module";

  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const Error& err) {
      switch (err.kind()) {
        case ErrorKind::Value: PyErr_SetString(PyExc_ValueError, err.what()); return;
        case ErrorKind::Type: PyErr_SetString(PyExc_TypeError, err.what()); return;
        case ErrorKind::NotImplemented: PyErr_SetString(PyExc_NotImplementedError, err.what()); return;
        case ErrorKind::Runtime: PyErr_SetString(PyExc_RuntimeError, err.what()); return;
      }
    }
  });

  py::class_<TensorView>(m, "TensorView")
      .def(py::init(&make_view), py::arg("ptr"), py::arg("dtype"), py::arg("device"), py::arg("device_id"),
           py::arg("shape"), py::arg("strides"))
      .def_property_readonly("shape", [](const TensorView& t) { return std::vector<int64_t>(t.shape, t.shape + t.ndim); })
      .def_property_readonly("strides", [](const TensorView& t) { return std::vector<int64_t>(t.stride, t.stride + t.ndim); })
      .def_property_readonly("dtype", [](const TensorView& t) { return std::string(dtype_name(t.dtype)); });

  m.def("rope", &rope, py::arg("q"), py::arg("q_out"), py::arg("k").none(true), py::arg("k_out").none(true),
        py::arg("positions").none(true), py::arg("inv_freq"), py::arg("attention_factor"), py::arg("interleaved"),
        py::arg("conjugate"), py::arg("stream"));
  m.def("rope_torch_cpu", &rope_torch_cpu, py::arg("q"), py::arg("q_out"), py::arg("k").none(true),
        py::arg("k_out").none(true), py::arg("positions").none(true), py::arg("inv_freq"),
        py::arg("attention_factor"), py::arg("interleaved"), py::arg("conjugate"));

  py::class_<BlockSparseArgs>(m, "BlockSparse")
      .def(py::init([](const TensorView& kv_num, const TensorView& kv_idx, const TensorView& full_num,
                       const TensorView& full_idx, const TensorView& q_num, const TensorView& q_idx,
                       const TensorView& full_q_num, const TensorView& full_q_idx, const TensorView& bits,
                       const TensorView& kv_bits, const TensorView& q_bits, int64_t block_q, int64_t block_k,
                       bool causal, int64_t wl, int64_t wr, int64_t sink) {
             return BlockSparseArgs{kv_num, kv_idx, full_num,   full_idx, q_num, q_idx,   full_q_num, full_q_idx,
                                    bits,   kv_bits, q_bits,    block_q,  block_k, causal, wl,         wr,
                                    sink};
           }),
           py::arg("kv_num"), py::arg("kv_idx"), py::arg("full_num"), py::arg("full_idx"), py::arg("q_num"),
           py::arg("q_idx"), py::arg("full_q_num"), py::arg("full_q_idx"), py::arg("bits"), py::arg("kv_bits"),
           py::arg("q_bits"), py::arg("block_q"),
           py::arg("block_k"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
           py::arg("sink_tokens"));
  auto args = [](const TensorView* cu_q, const TensorView* cu_k, int64_t max_q, int64_t max_k, double scale,
                 double softcap, const TensorView* alibi, int64_t wl, int64_t wr, bool causal,
                 const BlockSparseArgs* sparse) {
    return AttentionArgs{sparse, cu_q, cu_k, max_q, max_k, scale, softcap, alibi, wl, wr, causal, false};
  };
  m.def(
      "attention_forward",
      [args](const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, const TensorView* lse,
             const TensorView* cu_q, const TensorView* cu_k, int64_t max_q, int64_t max_k, double scale, double softcap,
             const TensorView* alibi, int64_t wl, int64_t wr, bool causal, uintptr_t stream,
             const BlockSparseArgs* sparse) {
        attention_forward(q, k, v, out, lse,
                          args(cu_q, cu_k, max_q, max_k, scale, softcap, alibi, wl, wr, causal, sparse), stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse").none(true),
      py::arg("cu_seqlens_q").none(true), py::arg("cu_seqlens_k").none(true), py::arg("max_seqlen_q"),
      py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"), py::arg("alibi_slopes").none(true),
      py::arg("window_left"), py::arg("window_right"), py::arg("causal"), py::arg("stream"),
      py::arg("block_sparse").none(true) = py::none());
  m.def("set_torch_dtypes", &set_torch_dtypes, py::arg("dtypes"));
  // attention_forward on dense torch CPU tensors, described here rather than in Python.
  m.def(
      "attention_forward_torch_cpu",
      [](py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse, py::handle alibi, double scale,
         double softcap, int64_t wl, int64_t wr, bool causal) {
        const char* op = "flash_attention";
        const TensorView qv = torch_cpu_float_view(q, op, "q"), kv = torch_cpu_float_view(k, op, "k"),
                         vv = torch_cpu_float_view(v, op, "v"), ov = torch_cpu_float_view(out, op, "out");
        TensorView lv, av;  // lse may be None (not wanted: an eager call without return_lse)
        const bool has_lse = torch_cpu_view_opt(lse, op, "lse", DType::Float32, DType::Float32, "float32", lv);
        const bool has_alibi =
            torch_cpu_view_opt(alibi, op, "alibi_slopes", DType::Float32, DType::Float32, "float32", av);
        attention_forward(qv, kv, vv, ov, has_lse ? &lv : nullptr,
                          AttentionArgs{nullptr, nullptr, nullptr, 0, 0, scale, softcap, has_alibi ? &av : nullptr,
                                        wl, wr, causal, false},
                          0);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse").none(true),
      py::arg("alibi_slopes").none(true), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
      py::arg("window_right"), py::arg("causal"));
  m.def(
      "attention_backward",
      [args](const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
             const TensorView& dout, const TensorView* dlse, const TensorView& dq, const TensorView& dk,
             const TensorView& dv, const TensorView* cu_q, const TensorView* cu_k, int64_t max_q, int64_t max_k, double scale, double softcap,
             const TensorView* alibi, int64_t wl, int64_t wr, bool causal, uintptr_t stream,
             const BlockSparseArgs* sparse, const TensorView* dq_accum, const TensorView* delta, bool deterministic) {
        AttentionArgs a = args(cu_q, cu_k, max_q, max_k, scale, softcap, alibi, wl, wr, causal, sparse);
        a.deterministic = deterministic;
        attention_backward(q, k, v, out, lse, dout, dlse, dq, dk, dv, dq_accum, delta, a, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dout"), py::arg("dlse").none(true), py::arg("dq"),
      py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens_q").none(true), py::arg("cu_seqlens_k").none(true),
      py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"),
      py::arg("alibi_slopes").none(true), py::arg("window_left"), py::arg("window_right"), py::arg("causal"),
      py::arg("stream"), py::arg("block_sparse").none(true) = py::none(), py::arg("dq_accum").none(true) = nullptr,
      py::arg("delta").none(true) = nullptr, py::arg("deterministic") = false);
  register_linear_attention(m);
  m.def("build_info", &build_info);
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    LONGATTN_CHECK_VALUE(n >= 1, checks::cat("set_num_threads: n must be >= 1, got ", n));
    set_num_threads(n);
  });
  m.def("cpu_cache_bytes", [] { return host_cache_bytes(); });
  m.def("cpu_cache_limit", [] { return host_cache_limit(); });
  m.def("set_cpu_cache_limit", [](int64_t bytes) {
    LONGATTN_CHECK_VALUE(bytes >= 0, checks::cat("set_cpu_cache_limit: nbytes must be >= 0, got ", bytes));
    set_host_cache_limit(size_t(bytes));
  });
  m.def("empty_cache", [] { host_cache_release(); });
}
