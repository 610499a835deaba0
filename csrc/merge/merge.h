// Weight-space merge ops for nova_rt._C: declarations shared by the CPU (merge_cpu.cpp) and CUDA (merge_cuda.cu)
// implementations and the bindings (bindings.cpp).
//
// Every op reads N same-shape, same-dtype contiguous inputs (fp32 / fp16 / bf16), accumulates in fp32 and writes a
// fresh tensor in the requested output dtype, so a merge never materialises an fp32 copy of any input.
// Math (tau_i = theta_i - base, w_i weights; formulas follow mergekit 0.1.5, see nova_rt/merge/reference.py):
//   weighted_sum  out = scale * sum_i w_i x_i
//   gta           out = base + lambda * mix(tau) / div        (task arithmetic, TIES, DARE-linear, DARE-TIES)
//                 tau'_i = w_i * sparsify_i(tau_i); sparsify = none | magnitude top-k | seeded Bernoulli keep
//                 no consensus: mix = sum_i tau'_i, div = sum_i w_i (1 when |.| < 1e-8 or normalize is off)
//                 consensus:    maj = sign(sum_i tau'_i) (>= 0 -> +1); keep_i = sign(tau'_i) == maj
//                               mix = sum_i keep_i tau'_i, div = sum_i keep_i w_i (0 -> 1; 1 when normalize is off)
//   slerp         out = sin((1-t) th)/sin th * a + sin(t th)/sin th * b, th = acos(<a/|a|, b/|b|>); lerp if |cos|>thr
//   model_stock   per row (whole tensor, or each last-dim row when filter_wise): c = mean_{i<j} cos(tau_i, tau_j),
//                 t = N c / (1 + (N-1) c) (0 when the denominator is ~0); out = t * mean_i x_i + (1 - t) base
// DARE masks come from a counter-based hash of (seed, tensor_id, model index, element index), so CPU, CUDA and any
// thread count draw the same mask (and nova_rt/merge/reference.py reproduces it with int64 tensor ops).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define NOVA_HD __host__ __device__ __forceinline__
#else
#define NOVA_HD inline
#endif

namespace nova_rt {

constexpr int kMaxModels = 32;  // per-launch bound for the CUDA kernels (pointer arrays live in kernel params)

enum class Sparsify : int64_t { kNone = 0, kMagnitude = 1, kRandom = 2 };

// splitmix64 finaliser (Steele et al. 2014): a bijective 64-bit mix; consecutive counters give independent outputs.
NOVA_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// One independent stream per (seed, tensor, model); element e draws splitmix64(stream + e).
NOVA_HD uint64_t dare_stream(int64_t seed, int64_t tensor_id, int64_t model) {
  return splitmix64(splitmix64(splitmix64(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(tensor_id)) ^
                    static_cast<uint64_t>(model));
}

// Keep element e with probability `density`: a 24-bit uniform u24 is kept iff u24 < density * 2^24 (exact in double).
NOVA_HD bool dare_keep(uint64_t stream, int64_t e, double density) {
  const uint64_t u24 = splitmix64(stream + static_cast<uint64_t>(e)) >> 40;
  return static_cast<double>(u24) < density * 16777216.0;
}

// Per-model sparsification state for gta. Magnitude: keep |tau| > thr, or |tau| == thr with flat index < cutoff
// (exactly k kept, ties broken by index). Random: keep per dare_keep, then multiply by `scale` (1/density or 1).
struct SparsifyParam {
  double thr;
  int64_t cutoff;
  double density;
  float scale;
  uint64_t stream;
};

struct GtaArgs {
  std::vector<double> weights;
  std::vector<double> densities;
  Sparsify sparsify;
  bool consensus;
  bool normalize;
  double lambda;
  bool rescale;
  int64_t seed;
  int64_t tensor_id;
  // Row-blocked merging (CPU; blocked_cpu.cpp): the inputs are elements [offset, offset + numel) of a larger tensor,
  // so DARE draws and magnitude tie cutoffs use flat index offset + e; mag_thr / mag_cutoff (magnitude bits and tie
  // cutoff per model, from the whole tensor's histograms) replace the top-k selection when not empty.
  int64_t offset = 0;
  std::vector<int64_t> mag_thr = {};
  std::vector<int64_t> mag_cutoff = {};
};

// ---- CPU (merge_cpu.cpp) ----
// Each writes into `out` (same shape as the inputs, contiguous, CPU; its dtype is the output dtype), which the
// caller allocates: the streaming merge passes a view of the output file's mapping.
void weighted_sum_cpu(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                      torch::Tensor& out);
void gta_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const GtaArgs& args, torch::Tensor& out);
// sums: |a|^2, |b|^2, <a, b> of the whole tensor when a and b are one block of it (blocked merging), else empty.
void slerp_cpu(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
               torch::Tensor& out, const std::vector<double>& sums = {});
void model_stock_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                     torch::Tensor& out);
// Per-model (threshold, tie cutoff) of the magnitude sparsifier (top-k of |x_i - base|, topk_cpu.cpp); sampled
// selects from a sampled bracket, else radix select. thr -1 keeps all, +inf none.
std::vector<SparsifyParam> magnitude_params_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                                const std::vector<double>& densities, bool sampled = true);
// nearswap and RAM / RAM+ (extra_cpu.cpp; math there). scales: RAM+'s per-model factor of unique elements, empty for
// RAM. ram_counts_cpu: per model, its counted elements that other models count too (shared) and alone (unique).
void nearswap_cpu(const torch::Tensor& base, const torch::Tensor& x, double t, torch::Tensor& out);
void ram_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps,
             const std::vector<double>& scales, torch::Tensor& out);
std::vector<int64_t> ram_counts_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps);

// Row-blocked merging (blocked_cpu.cpp): passes over one block [offset, offset + numel) of an n_total-element
// tensor at a time. magnitude_histogram_cpu adds, per model, a 65536-bin histogram of magnitude-bit digit
// (bits >> shift) & 0xffff over the elements whose higher bits (bits >> (shift + 16)) equal prefix[i] (-1: all) into
// hist [models, 65536]. magnitude_equal_counts_cpu: per model, elements whose bits equal thr[i]. magnitude_nth_equal_cpu:
// 1 + block index of the need-th such element of model `model` (numel when fewer). slerp_partials_cpu adds the
// block's |a|^2, |b|^2, <a, b> into the same fixed chunks as slerp_cpu's whole-tensor pass (part [chunks, 3], fp64;
// offset a multiple of 1024), so the chunk sums are bit-identical.
void magnitude_histogram_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t shift,
                             const std::vector<int64_t>& prefix, torch::Tensor& hist);
std::vector<int64_t> magnitude_equal_counts_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                                const std::vector<int64_t>& thr);
int64_t magnitude_nth_equal_cpu(const torch::Tensor& base, const torch::Tensor& x, int64_t thr, int64_t need);
void slerp_partials_cpu(const torch::Tensor& a, const torch::Tensor& b, int64_t offset, int64_t n_total,
                        torch::Tensor& part);
int64_t slerp_chunks(int64_t n_total);

#ifdef NOVA_RT_WITH_CUDA
// ---- CUDA (merge_cuda.cu) ----
torch::Tensor weighted_sum_cuda(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                                at::ScalarType out_dtype);
torch::Tensor gta_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const GtaArgs& args,
                       at::ScalarType out_dtype);
torch::Tensor slerp_cuda(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
                         at::ScalarType out_dtype);
torch::Tensor model_stock_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                               at::ScalarType out_dtype);
#endif

// Shared host helpers (merge_cpu.cpp).
// k kept elements for a density, mergekit's rule: density >= 1 keeps all, <= 0 none, else max(1, int(density * n)).
int64_t magnitude_k(double density, int64_t numel);
// Sparsify params for the random (DARE) mode, identical on both devices.
std::vector<SparsifyParam> random_params(const GtaArgs& args, int64_t n_models);
// mergekit's SLERP coefficients from |a|^2, |b|^2 and <a, b>: norms <= eps count as 1, cos is clamped to [-1, 1],
// and |cos| > dot_threshold falls back to lerp (1 - t, t).
inline void slerp_coefficients(double aa, double bb, double ab, double t, double dot_threshold, double eps, double* ca,
                               double* cb) {
  double na = std::sqrt(aa), nb = std::sqrt(bb);
  na = na > eps ? na : 1.0;
  nb = nb > eps ? nb : 1.0;
  const double dot = std::min(1.0, std::max(-1.0, ab / (na * nb)));
  *ca = 1.0 - t;
  *cb = t;
  if (std::abs(dot) <= dot_threshold) {
    const double theta = std::acos(dot), s = std::sin(theta);
    *ca = std::sin((1.0 - t) * theta) / s;
    *cb = std::sin(t * theta) / s;
  }
}
// Divisor of the no-consensus path: sum(w) when normalising (1 when |sum(w)| < 1e-8, as mergekit), else 1.
double gta_linear_divisor(const GtaArgs& args);

}  // namespace nova_rt
