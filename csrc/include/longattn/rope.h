// Fused rotary position embedding (RoFormer, Su et al. 2021) for q and k in one pass.
//   angle_i = float32(position) * inv_freq_i              (float32 product, as transformers)
//   c_i = cos(angle_i) * attention_factor, s_i = sign * sin(angle_i) * attention_factor
//   NeoX (half):   y_i = x_i c_i - x_{i+h} s_i,   y_{i+h} = x_{i+h} c_i + x_i s_i
//   GPT-J (pairs): y_2i = x_2i c_i - x_2i+1 s_i,  y_2i+1 = x_2i+1 c_i + x_2i s_i
// sign = -1 gives the conjugate rotation, which is the backward of the forward.
// Channels [2h, D) are copied unchanged (partial rotary) unless the op is in place.
#pragma once

#include <cstdint>

#include "longattn/tensor.h"

namespace longattn {

constexpr int kRopeMaxHalf = 256;  // rotary_dim <= 512

struct RopeParams {
  const void* q = nullptr;
  void* q_out = nullptr;
  const void* k = nullptr;  // null when only q is rotated
  void* k_out = nullptr;
  const void* positions = nullptr;  // null: position = sequence index
  DType dtype = DType::Float32;
  DType pos_dtype = DType::Int64;
  int64_t batch = 0, seqlen = 0, hq = 0, hk = 0, head_dim = 0, rotary_half = 0;
  // Strides in elements over (batch, seq, head); the last dim is contiguous.
  int64_t q_stride[3] = {}, q_out_stride[3] = {}, k_stride[3] = {}, k_out_stride[3] = {};
  int64_t pos_stride[2] = {};  // (batch, seq); batch stride 0 for shared (S,) positions
  double attention_factor = 1.0;  // double so float64 inputs keep full precision
  float sin_sign = 1.f;
  bool interleaved = false;
  float inv_freq[kRopeMaxHalf] = {};
};

namespace cpu {
void rope(const RopeParams& p);
}

namespace cuda {
// Returns the CUDA status of the launch; does not synchronize.
int rope(const RopeParams& p, void* stream);
}

}  // namespace longattn
