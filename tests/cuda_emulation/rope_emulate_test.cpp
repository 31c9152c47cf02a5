// Runs the CUDA RoPE kernel (csrc/cuda/rope.cuh) on the host through flash_emulate.h and
// compares it with a float64 reference written from the definition: for rotary pair i of
// a head, with angle a = float32(position * inv_freq[i]) (as transformers computes it),
// c = cos(a) * attention_factor, s = sin(a) * attention_factor * sin_sign,
//   (x1, x2) -> (x1 c - x2 s, x2 c + x1 s),
// where (x1, x2) = (x[i], x[i + half]) (NeoX layout) or (x[2i], x[2i + 1]) (GPT-J,
// interleaved); channels past 2 * half pass through. Covers both the 16-byte vector path
// and the scalar path of each layout and dtype, in place and out of place, q with and
// without k, int32 / int64 / implicit positions, and a grid smaller than the token count
// (the kernel's grid-stride loop). Build and run: tests/cuda_emulation/run.sh rope
#define LONGATTN_FLASH_EMULATE 1
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "rope.cuh"

using namespace longattn;
using namespace longattn::cuda;
namespace emu = longattn::cuda::flash::emu;

struct Cfg {
  int B = 2, S = 5, Hq = 3, Hk = 1, D = 64, half = 32;
  int pitch = 0;           // row pitch of a head in elements (0: D); an odd pitch forces the scalar path
  bool with_k = true, inplace = false, interleaved = false;
  int positions = 0;       // 0 none, 1 int32 shared over the batch, 2 int64 per (batch, seq)
  int64_t pos_scale = 1;   // positions are pos_scale * (random in [0, 1000))
  double factor = 1.0;
  float sin_sign = 1.f;
  int grid = 0;            // 0: one CTA per token
  int expect_vec = -1;     // 1 / 0: the case must take the vector / scalar path
};

template <typename T>
double to_d(T x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return double(float(x));
}
template <typename T>
T from_d(double x) {
  if constexpr (std::is_same_v<T, float>) return float(x);
  else return T(float(x));
}

template <typename T, bool Interleaved>
bool run_case(const std::string& name, const Cfg& c) {
  const int pitch = c.pitch ? c.pitch : c.D;
  const int64_t hstride = pitch, sstride_q = int64_t(c.Hq) * pitch, sstride_k = int64_t(c.Hk) * pitch;
  const int64_t nq = int64_t(c.B) * c.S * sstride_q, nk = int64_t(c.B) * c.S * sstride_k;
  std::mt19937 rng(1234);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> q(nq), k(nk), qo(nq, from_d<T>(-7.0)), ko(nk, from_d<T>(-7.0));
  for (auto& x : q) x = from_d<T>(nd(rng));
  for (auto& x : k) x = from_d<T>(nd(rng));
  const std::vector<T> q0 = q, k0 = k;
  std::vector<int32_t> pos32(c.S);
  std::vector<int64_t> pos64(int64_t(c.B) * c.S);
  std::uniform_int_distribution<int> ud(0, 999);
  for (auto& x : pos32) x = int32_t(ud(rng) * c.pos_scale);
  for (auto& x : pos64) x = int64_t(ud(rng)) * c.pos_scale;

  RopeParams p;
  p.dtype = std::is_same_v<T, float> ? DType::Float32 : std::is_same_v<T, __half> ? DType::Float16 : DType::BFloat16;
  p.batch = c.B;
  p.seqlen = c.S;
  p.hq = c.Hq;
  p.hk = c.with_k ? c.Hk : 0;
  p.head_dim = c.D;
  p.rotary_half = c.half;
  p.interleaved = Interleaved;
  p.attention_factor = c.factor;
  p.sin_sign = c.sin_sign;
  p.q = q.data();
  p.q_out = c.inplace ? q.data() : qo.data();
  const int64_t sq[3] = {c.S * sstride_q, sstride_q, hstride}, sk[3] = {c.S * sstride_k, sstride_k, hstride};
  for (int i = 0; i < 3; ++i) p.q_stride[i] = p.q_out_stride[i] = sq[i];
  if (c.with_k) {
    p.k = k.data();
    p.k_out = c.inplace ? k.data() : ko.data();
    for (int i = 0; i < 3; ++i) p.k_stride[i] = p.k_out_stride[i] = sk[i];
  }
  if (c.positions == 1) {
    p.positions = pos32.data();
    p.pos_dtype = DType::Int32;
    p.pos_stride[0] = 0;
    p.pos_stride[1] = 1;
  } else if (c.positions == 2) {
    p.positions = pos64.data();
    p.pos_dtype = DType::Int64;
    p.pos_stride[0] = c.S;
    p.pos_stride[1] = 1;
  }
  const int rot = 2 * c.half;
  for (int i = 0; i < c.half; ++i) p.inv_freq[i] = float(std::pow(10000.0, -double(2 * i) / rot));

  const bool vec = rope_vectorizable<T>(p);
  if (c.expect_vec >= 0 && int(vec) != c.expect_vec) {
    std::printf("FAIL %s: expected the %s path\n", name.c_str(), c.expect_vec ? "vector" : "scalar");
    return false;
  }
  const int64_t tokens = int64_t(c.B) * c.S;
  const emu::Dim3 grid{unsigned(c.grid ? c.grid : tokens), 1, 1};
  constexpr int VW = 16 / sizeof(T);
  if (vec)
    emu::launch(grid, kRopeThreads, [&] { rope_kernel<T, Interleaved, VW>(p); }, 0);
  else
    emu::launch(grid, kRopeThreads, [&] { rope_kernel<T, Interleaved, 1>(p); }, 0);

  // Reference and comparison, q heads then k heads.
  double err = 0, worst_rel = 0;
  bool pass_ok = true;
  const double tol = std::is_same_v<T, float> ? 2e-6 : std::is_same_v<T, __half> ? 1.5e-3 : 1.2e-2;
  auto check = [&](const std::vector<T>& in, const std::vector<T>& out, int heads, int64_t s_stride) {
    for (int b = 0; b < c.B; ++b)
      for (int s = 0; s < c.S; ++s) {
        int64_t pos = s;
        if (c.positions == 1) pos = pos32[s];
        if (c.positions == 2) pos = pos64[int64_t(b) * c.S + s];
        for (int h = 0; h < heads; ++h) {
          const int64_t base = (int64_t(b) * c.S + s) * s_stride + int64_t(h) * hstride;
          for (int i = 0; i < c.half; ++i) {
            const float a = float(pos) * p.inv_freq[i];
            const double cs = std::cos(double(a)) * c.factor, sn = std::sin(double(a)) * c.factor * c.sin_sign;
            const int i1 = Interleaved ? 2 * i : i, i2 = Interleaved ? 2 * i + 1 : i + c.half;
            const double x1 = to_d(in[base + i1]), x2 = to_d(in[base + i2]);
            const double r1 = x1 * cs - x2 * sn, r2 = x2 * cs + x1 * sn;
            const double e1 = std::fabs(to_d(out[base + i1]) - r1), e2 = std::fabs(to_d(out[base + i2]) - r2);
            err = std::max(err, std::max(e1, e2));
            worst_rel = std::max(worst_rel, std::max(e1 / std::max(1.0, std::fabs(r1)), e2 / std::max(1.0, std::fabs(r2))));
          }
          for (int d = rot; d < c.D; ++d)  // pass-through channels: copied, bit for bit
            if (std::memcmp(&out[base + d], &in[base + d], sizeof(T)) != 0) pass_ok = false;
          for (int d = c.D; d < pitch; ++d)  // padding between heads is never written
            if (!c.inplace && to_d(out[base + d]) != -7.0) pass_ok = false;
        }
      }
  };
  check(q0, c.inplace ? q : qo, c.Hq, sstride_q);
  if (c.with_k) check(k0, c.inplace ? k : ko, c.Hk, sstride_k);
  if (!c.with_k && !c.inplace)
    for (const T& x : ko)
      if (to_d(x) != -7.0) pass_ok = false;
  const bool ok = worst_rel <= tol && pass_ok;
  std::printf("%-4s %-46s %s path, max err %.2e (rel %.2e, tol %.1e)%s\n", ok ? "ok" : "FAIL", name.c_str(),
              vec ? "vector" : "scalar", err, worst_rel, tol, pass_ok ? "" : ", pass-through / padding wrong");
  return ok;
}

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int fails = 0;
  auto run = [&](const std::string& name, auto fn) {
    if (!emu::selected(name, only)) return;
    fails += !fn();
  };
  {
    Cfg c;
    c.grid = 3;  // 10 tokens on 3 CTAs
    c.expect_vec = 1;
    run("f32 neox q+k out-of-place grid-stride", [&] { return run_case<float, false>("f32 neox q+k out-of-place grid-stride", c); });
  }
  {
    Cfg c;
    c.with_k = false;
    c.inplace = true;
    c.positions = 1;
    c.expect_vec = 1;
    run("f16 gptj q in place int32 positions", [&] { return run_case<__half, true>("f16 gptj q in place int32 positions", c); });
  }
  {
    Cfg c;
    c.D = 64;
    c.half = 16;  // partial rotary: 32 pass-through channels copied
    c.positions = 2;
    c.factor = 1.2;
    c.sin_sign = -1.f;
    c.expect_vec = 1;
    run("bf16 neox partial factor sin-sign int64", [&] { return run_case<__nv_bfloat16, false>("bf16 neox partial factor sin-sign int64", c); });
  }
  {
    Cfg c;
    c.D = 10;
    c.half = 5;
    c.expect_vec = 0;
    run("f16 neox d10 scalar", [&] { return run_case<__half, false>("f16 neox d10 scalar", c); });
  }
  {
    Cfg c;
    c.D = 6;
    c.half = 2;
    c.positions = 2;
    c.expect_vec = 0;
    run("bf16 gptj d6 partial scalar", [&] { return run_case<__nv_bfloat16, true>("bf16 gptj d6 partial scalar", c); });
  }
  {
    Cfg c;
    c.D = 128;
    c.half = 64;
    c.positions = 2;
    c.pos_scale = 100;  // positions up to ~1e5
    c.Hq = 4;
    c.Hk = 2;
    c.expect_vec = 1;
    run("f32 gptj d128 long positions", [&] { return run_case<float, true>("f32 gptj d128 long positions", c); });
  }
  {
    Cfg c;
    c.D = 64;
    c.half = 24;
    c.inplace = true;  // pass-through channels stay untouched
    c.positions = 1;
    c.expect_vec = 1;
    run("f16 neox partial in place", [&] { return run_case<__half, false>("f16 neox partial in place", c); });
  }
  {
    Cfg c;
    c.pitch = 72;  // padded head rows, still 16-byte multiples
    c.expect_vec = 1;
    run("bf16 gptj padded pitch vector", [&] { return run_case<__nv_bfloat16, true>("bf16 gptj padded pitch vector", c); });
  }
  {
    Cfg c;
    c.pitch = 65;  // odd pitch: misaligned rows
    c.grid = 4;
    c.expect_vec = 0;
    run("f32 neox odd pitch scalar grid-stride", [&] { return run_case<float, false>("f32 neox odd pitch scalar grid-stride", c); });
  }
  {
    Cfg c;
    c.pitch = 66;
    c.D = 64;
    c.half = 30;
    c.expect_vec = 0;
    run("f16 gptj odd split scalar", [&] { return run_case<__half, true>("f16 gptj odd split scalar", c); });
  }
  std::printf("%d failure(s)\n", fails);
  return fails ? 1 : 0;
}
