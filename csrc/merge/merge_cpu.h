// Helpers shared by the CPU merge ops (merge_cpu.cpp) and the TIES top-k selection (topk_cpu.cpp).
#pragma once

#include "merge.h"

#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>

// No fused multiply-add contraction (GCC contracts by default in C++): every product and sum is rounded on its own,
// as in PyTorch's eager ops, so fp32 merges stay bit-identical to the reference and to mergekit (a compile-time
// sparsifier let GCC fuse `sum += w * d` and moved 0.07% of a task-arithmetic merge by one bf16 ulp).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace nova_rt {
namespace cpu {

constexpr int64_t kBlock = 1024;
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements, threads cost more than they save
constexpr int64_t kChunks = 256;           // reduction chunks (fixed, so results do not depend on the thread count)

inline int64_t n_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Magnitudes |x - base| as signed integers of the accumulator's width: a magnitude's sign bit is clear, so its bit
// pattern is a non-negative integer that orders like the value (NaNs above +inf). Comparing these integers is exact,
// vectorises, and lets the top-k selection and the keep test of the element loop use one representation.
template <typename acc_t>
struct MagBits;
template <>
struct MagBits<float> {
  using S = int32_t;
};
template <>
struct MagBits<double> {
  using S = int64_t;
};

template <typename acc_t>
inline typename MagBits<acc_t>::S mag_bits(acc_t d) {
  const acc_t ad = std::abs(d);
  typename MagBits<acc_t>::S u;
  std::memcpy(&u, &ad, sizeof(u));
  return u;
}

// c ? v : +0 through a bit mask instead of a branch or a blend the compiler may not if-convert, so element loops
// with data-dependent selects (TIES keep and sign agreement) vectorise; exact for every v, NaN and inf included.
template <typename acc_t>
inline acc_t select_or_zero(bool c, acc_t v) {
  typename MagBits<acc_t>::S bits;
  std::memcpy(&bits, &v, sizeof(v));
  bits &= -static_cast<typename MagBits<acc_t>::S>(c);
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Exact keep rule of one model's magnitude sparsifier: keep |tau_e| with bits > thr, or == thr and e < cutoff.
// Keep-all is {0, INT64_MAX}; keep-none is {max, 0}.
template <typename acc_t>
struct MagKeep {
  typename MagBits<acc_t>::S thr;
  int64_t cutoff;
};

// Per-model keep rules for densities[i] (exactly magnitude_k(densities[i], n) elements kept per model).
// sampled: select from a sampled bracket (one fused pass over all models); else radix select (used as the fallback
// when the bracket misses, and by tests).
template <typename in_t, typename acc_t>
std::vector<MagKeep<acc_t>> magnitude_keep(const in_t* base, const std::vector<const in_t*>& xs, int64_t n,
                                           const std::vector<double>& densities, bool sampled);

}  // namespace cpu
}  // namespace nova_rt
