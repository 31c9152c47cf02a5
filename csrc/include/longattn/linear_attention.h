// Linear attention (Katharopoulos et al. 2020) with optional decay (RetNet, Sun et al.
// 2023; gated linear attention with scalar gates, Yang et al. 2023), computed in the
// chunked form: inside a chunk of `chunk_size` tokens a masked quadratic product, across
// chunks a K x V state carried in float32 (float64 for float64 inputs).
//
// With q~ = scale * phi(q), k~ = phi(k) (phi: identity, elu + 1 or relu):
//   causal:     S_t = exp(g_t) S_{t-1} + k~_t v_t^T,   o_t = S_t^T q~_t
//   non-causal: S   = S_0 + sum_t k~_t v_t^T,           o_t = S^T q~_t
// normalize:   z_t = exp(g_t) z_{t-1} + k~_t,  out_t = o_t / (q~_t . z_t + 1e-10)
// Decays are applied through differences of within-chunk cumulative log-decays, so every
// exponent is <= 0. The normalizer is carried as an extra value column (v augmented by a
// column of ones), so one code path serves both.
#pragma once

#include <cstdint>

#include "longattn/tensor.h"

namespace longattn {

enum class FeatureMap : int { Identity = 0, Elu1 = 1, Relu = 2 };

struct LinearAttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  DType dtype = DType::Float32;  // of q, k, v, out; state and decay are float32 (float64 for float64)

  int64_t batch = 0;  // sequences (dense batch, or cu_seqlens entries - 1)
  int64_t heads = 0, head_dim = 0, head_dim_v = 0;
  int64_t seqlen = 0;  // dense only
  // Element strides over (batch, token, head); last dim contiguous. Packed input has one
  // batch row and per-sequence token offsets in cu_seqlens.
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, out_stride[3] = {};
  const int32_t* cu_seqlens = nullptr;
  int64_t max_seqlen = 0;  // packed: the longest sequence, 0 if not known (CUDA then never
                           // picks the step kernel, which walks a sequence token by token)

  double scale = 1.0;
  FeatureMap feature_map = FeatureMap::Identity;
  bool causal = true;
  bool normalize = false;
  int64_t chunk_size = 64;

  // Log-decay (compute dtype): per head (strides 0, 0, 1) or per token (batch, token, head).
  const void* log_decay = nullptr;
  int64_t g_stride[3] = {};

  // States, contiguous, compute dtype: S (batch, heads, K, V), z (batch, heads, K). Any may
  // be null (initial: zero; final: not written). final may alias initial (in-place step):
  // each (sequence, head) reads its initial state before writing its final one.
  const void* initial_state = nullptr;
  const void* initial_z = nullptr;
  void* final_state = nullptr;
  void* final_z = nullptr;

  int64_t seq_len(int64_t b) const { return cu_seqlens ? cu_seqlens[b + 1] - cu_seqlens[b] : seqlen; }
  int64_t tok0(int64_t b) const { return cu_seqlens ? cu_seqlens[b] : 0; }
  int64_t brow(int64_t b) const { return cu_seqlens ? 0 : b; }
};

struct LinearAttentionGradParams {
  LinearAttentionParams fwd;  // q, k, v and options of the forward (out is unused)
  const void* dout = nullptr;
  int64_t dout_stride[3] = {};
  const void* d_final_state = nullptr;  // optional, contiguous like final_state
  const void* d_final_z = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  void* d_initial_state = nullptr;  // optional outputs, contiguous
  void* d_initial_z = nullptr;
  void* d_log_decay = nullptr;  // per token (batch, token, head), compute dtype; null: not needed
  int64_t dg_stride[3] = {};
  // CUDA only: scratch of at least cuda::linear_attention_backward_workspace(*this) bytes,
  // 256-byte aligned, allocated by the caller.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

namespace cpu {
void linear_attention_forward(const LinearAttentionParams& p);
void linear_attention_backward(const LinearAttentionGradParams& g);
}  // namespace cpu

namespace cuda {
// float16 / bfloat16, head_dim <= 256, head_dim_v <= 256 (<= 255 with normalize), sm80+;
// chunks of 64 tokens whatever chunk_size says. Causal calls whose sequences are all at
// most 8 tokens long (on average, for packed batches) run the recurrent step kernel.
// final_z must not alias initial_z when head_dim_v > 32 (value tiles share z). Launch on
// `stream` (a cudaStream_t) without synchronizing; return the cudaError_t as int.
int linear_attention_forward(const LinearAttentionParams& p, void* stream);
int linear_attention_backward(const LinearAttentionGradParams& g, void* stream);
// Bytes of float32 scratch the backward needs (g.workspace).
int64_t linear_attention_backward_workspace(const LinearAttentionGradParams& g);
}  // namespace cuda

}  // namespace longattn
