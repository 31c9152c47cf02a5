// Fused attention (FlashAttention-2 style, Dao 2023): for each query block, walk a schedule
// of key blocks, computing scores, an online softmax and the output without ever holding
// an Sq x Sk matrix. Forward saves the log-sum-exp; backward recomputes scores from it.
//
// Conventions (DESIGN.md): causal masks are aligned to the bottom-right corner, so query i
// of a sequence with sq queries and sk keys sees key j iff j <= i + sk - sq; a window
// (left, right) is measured from that same diagonal, -1 meaning unbounded. Scores are
//   s = scale * q.k;  s = softcap * tanh(s / softcap) (softcap > 0);  s -= slope * |i + sk - sq - j|
// A row with no visible key yields 0 and lse = -inf.
#pragma once

#include <cstdint>

#include "longattn/tensor.h"

namespace longattn {

// Explicit block lists from a BlockMask (python/longattn/block_mask.py). Key side: for each
// (batch|1, head|1, query block), sorted partial and full key blocks; query side (the
// transposes, read by the CUDA backward): for each (batch|1, head|1, key block), sorted
// partial and full query blocks. Partial blocks get the element mask (causal, window and
// sink tokens; bottom-right aligned); full blocks none. Index rows hold num_k_blocks
// (key side) or num_q_blocks (query side) slots. The binding checks shapes, dtypes and
// devices, and every count and index of host-resident lists; device-resident lists were
// validated where the BlockMask was built (the CUDA kernels also clamp what they read, so
// invalid contents can give wrong numbers but never an out-of-bounds access).
//
// Token-granular masks (BlockMask.from_mask_mod, the exact strided / dilated / Longformer
// builders, unions of different patterns) add per-partial-block bit masks: a pool `bits`
// of num_bits tiles, each block_q rows of bits_words int32 words (bit c % 32 of word c / 32
// of row r: element (r, c) of the tile is visible), and, aligned slot for slot with kv_idx
// and q_idx (same shapes and strides), the pool index of each listed partial block
// (kv_bits, q_bits). A partial element is visible iff the element mask above allows it
// and, when bits is not null, its bit is set. Pool indices of host lists are checked by the
// binding; the CUDA kernels clamp them to [0, num_bits).
struct BlockSparseSchedule {
  const int32_t* kv_num = nullptr;  // (B|1, H|1, nQb) partial counts
  const int32_t* kv_idx = nullptr;  // (B|1, H|1, nQb, nKb)
  const int32_t* full_num = nullptr;
  const int32_t* full_idx = nullptr;
  int64_t num_stride[3] = {};  // element strides over (batch, head, q block); 0 broadcasts
  int64_t idx_stride[3] = {};  // the same for the index arrays (the slot dim is contiguous)
  const int32_t* q_num = nullptr;  // (B|1, H|1, nKb) partial counts (query side; may be null on the CPU)
  const int32_t* q_idx = nullptr;  // (B|1, H|1, nKb, nQb)
  const int32_t* full_q_num = nullptr;
  const int32_t* full_q_idx = nullptr;
  int64_t q_num_stride[3] = {};  // element strides over (batch, head, k block); 0 broadcasts
  int64_t q_idx_stride[3] = {};
  int64_t num_q_blocks = 0, num_k_blocks = 0;  // nQb = ceil(seqlen_q / block_q), nKb likewise
  int64_t block_q = 0, block_k = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1, sink_tokens = 0;
  const int32_t* bits = nullptr;  // (num_bits, block_q, bits_words) or null
  int64_t num_bits = 0, bits_words = 0;
  const int32_t* kv_bits = nullptr;  // pool index per kv_idx slot (strides idx_stride); null iff bits is
  const int32_t* q_bits = nullptr;   // pool index per q_idx slot (strides q_idx_stride); null iff bits is

  // Bit (r, c) of pool tile `id`: r the row inside the query block, c the column inside the key block.
  bool bit(int64_t id, int64_t r, int64_t c) const {
    return (uint32_t(bits[(id * block_q + r) * bits_words + (c >> 5)]) >> (c & 31)) & 1u;
  }

  bool visible(int64_t i, int64_t j, int64_t sq, int64_t sk) const {
    const int64_t d = i + sk - sq;
    if (causal && j > d) return false;
    const bool in_window = (window_left < 0 || j >= d - window_left) && (window_right < 0 || j <= d + window_right);
    return in_window || j < sink_tokens;
  }
};

struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // float32
  DType dtype = DType::Float32;

  int64_t batch = 0, heads = 0, heads_kv = 0, head_dim = 0, head_dim_v = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // dense: every sequence; varlen: the maximum
  int64_t total_q = 0;                 // query tokens of the call: batch * seqlen_q, or the packed count
  // Element strides over (batch, token, head); the last dim is contiguous. Packed
  // variable-length input has batch stride 0 and per-sequence token offsets cu_seqlens.
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, out_stride[3] = {};
  int64_t lse_stride[3] = {};  // (batch, head, token)
  const int32_t* cu_seqlens_q = nullptr;  // null for dense batches
  const int32_t* cu_seqlens_k = nullptr;

  double scale = 1.0;  // double so float64 inputs keep full precision
  double softcap = 0.0;
  const float* alibi_slopes = nullptr;  // (B|1, H) float32
  int64_t alibi_batch_stride = 0;
  int64_t window_left = -1, window_right = -1;  // right already clamped to 0 when causal
  const BlockSparseSchedule* sparse = nullptr;  // explicit schedule (dense batches only)

  int64_t seq_q(int64_t b) const { return cu_seqlens_q ? cu_seqlens_q[b + 1] - cu_seqlens_q[b] : seqlen_q; }
  int64_t seq_k(int64_t b) const { return cu_seqlens_k ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seqlen_k; }
  int64_t tok_q(int64_t b) const { return cu_seqlens_q ? cu_seqlens_q[b] : 0; }
  int64_t tok_k(int64_t b) const { return cu_seqlens_k ? cu_seqlens_k[b] : 0; }
};

struct AttentionGradParams {
  AttentionParams fwd;  // q, k, v, out and lse of the forward
  const void* dout = nullptr;
  const float* dlse = nullptr;  // optional gradient of lse (same strides as lse)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dout_stride[3] = {}, dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};

  // CUDA only (the CPU backward ignores these). Workspaces allocated by the caller, float32:
  //   dq_accum: the shape of q with head_dim columns, contiguous: dense (batch, seqlen_q,
  //     heads, head_dim), varlen (total_q, heads, head_dim); strides (batch, token, head)
  //     in dq_accum_stride (batch stride 0 for varlen). Zeroed and reduced by the kernels;
  //     unused (may be null) when deterministic.
  //   delta: the shape of a contiguous lse, dense (batch, heads, seqlen_q), varlen (heads,
  //     total_q); strides (batch, head, token) in delta_stride. Written by the kernels.
  float* dq_accum = nullptr;
  float* delta = nullptr;
  int64_t dq_accum_stride[3] = {}, delta_stride[3] = {};
  // deterministic: dQ is computed by a separate kernel per query block that loops over key
  // blocks (no atomics), so every gradient is bitwise reproducible run to run.
  bool deterministic = false;
};

// The key range a block of queries [i0, i1) may see, and which key blocks inside it need
// the element mask. Dense, causal and windowed attention use this implicit schedule; the
// block-sparse op supplies explicit lists of full and partial blocks instead.
struct KeyRange {
  int64_t begin = 0, end = 0;            // keys [begin, end) intersect some row's window
  int64_t full_begin = 0, full_end = 0;  // keys every row of the block sees
};

inline KeyRange key_range(int64_t i0, int64_t i1, int64_t sq, int64_t sk, int64_t left, int64_t right) {
  const int64_t off = sk - sq;
  auto lo = [&](int64_t i) { return left < 0 ? int64_t(0) : i + off - left; };
  auto hi = [&](int64_t i) { return right < 0 ? sk : i + off + right + 1; };  // exclusive
  auto clamp = [&](int64_t x) { return x < 0 ? int64_t(0) : (x > sk ? sk : x); };
  KeyRange r;
  r.begin = clamp(lo(i0));
  r.end = clamp(hi(i1 - 1));
  r.full_begin = clamp(lo(i1 - 1));
  r.full_end = clamp(hi(i0));
  if (r.end < r.begin) r.end = r.begin;
  if (r.full_end < r.full_begin) r.full_end = r.full_begin;
  return r;
}

inline bool key_visible(int64_t i, int64_t j, int64_t sq, int64_t sk, int64_t left, int64_t right) {
  const int64_t d = i + sk - sq;
  return (left < 0 || j >= d - left) && (right < 0 || j <= d + right);
}

namespace cpu {
void attention_forward(const AttentionParams& p);
void attention_backward(const AttentionGradParams& p);
}  // namespace cpu

namespace cuda {
// float16 / bfloat16 only, max(head_dim, head_dim_v) <= 256, sm80+. Launch on `stream`
// (a cudaStream_t), do not synchronize; return the cudaError_t of the launches as int.
int attention_forward(const AttentionParams& p, void* stream);
int attention_backward(const AttentionGradParams& g, void* stream);
}  // namespace cuda

}  // namespace longattn
