// CPU kernels of the elementwise merge methods added after the first five (math: nova_rt/merge/reference_extra.py
// and reference_agents.py, whose PyTorch code they equal bit for bit on fp32/fp16/bf16/fp64 inputs):
//   nearswap   w = clamp(t / max(|base - x|, 1e-6), 0, 1); out = w x + (1 - w) base
//   ram        tau_i counts where |tau_i| > eps; c = number of counting models; out = base + sum_i v_i with
//              v_i = s_i tau_i where c = 1 (s_i = 1, or RAM+'s per-model scale), tau_i / c where c > 1, else 0
//   ram_counts per model: counted elements with c > 1 (shared) and with c = 1 (unique), for RAM+'s scales
// Same structure as merge_cpu.cpp: OpenMP over 1024-element blocks, fp32 accumulation (fp64 for fp64 inputs), no
// FMA contraction (merge_cpu.h), results independent of the thread count.
#include "merge_cpu.h"

#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

namespace nova_rt {
namespace {

using cpu::kBlock;
using cpu::kParallelMin;
using cpu::n_blocks;

#define NOVA_EXTRA_DISPATCH(IN_TYPE, OUT_TYPE, NAME, ...)                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, IN_TYPE, NAME, [&] {                              \
    using in_t = scalar_t;                                                                                     \
    using acc_t = at::opmath_type<in_t>;                                                                       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, OUT_TYPE, NAME, [&] {                           \
      using out_t = scalar_t;                                                                                  \
      __VA_ARGS__();                                                                                           \
    });                                                                                                        \
  })

template <typename in_t, typename acc_t, typename out_t>
void nearswap_impl(const in_t* base, const in_t* x, acc_t t, out_t* out, int64_t n) {
#pragma omp parallel for schedule(dynamic, 16) if (n > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
    const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
    for (int64_t e = 0; e < len; ++e) {
      const acc_t a = static_cast<acc_t>(base[s + e]), b = static_cast<acc_t>(x[s + e]);
      const acc_t distance = std::max(std::abs(a - b), acc_t(1e-6));
      // (1 / distance) * t, not t / distance: PyTorch evaluates `scalar / tensor` as reciprocal * scalar
      const acc_t w = std::min(std::max((acc_t(1) / distance) * t, acc_t(0)), acc_t(1));
      out[s + e] = static_cast<out_t>(w * b + (acc_t(1) - w) * a);
    }
  }
}

// How many models count (|tau_i| > eps) at each element of one block.
template <typename in_t, typename acc_t>
void block_counts(const acc_t* b, const std::vector<const in_t*>& xs, int64_t s, int64_t len, acc_t eps,
                  int32_t* count) {
  for (int64_t e = 0; e < len; ++e) count[e] = 0;
  for (const in_t* x : xs)
    for (int64_t e = 0; e < len; ++e) count[e] += std::abs(static_cast<acc_t>(x[s + e]) - b[e]) > eps;
}

template <typename in_t, typename acc_t>
std::vector<int64_t> ram_counts_impl(const in_t* base, const std::vector<const in_t*>& xs, acc_t eps, int64_t n) {
  const int64_t m = static_cast<int64_t>(xs.size());
  std::vector<int64_t> total(2 * m, 0);  // [shared_0, unique_0, shared_1, ...]
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<int64_t> local(2 * m, 0);
#pragma omp for schedule(dynamic, 16)
    for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
      const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
      acc_t b[kBlock];
      int32_t count[kBlock];
      for (int64_t e = 0; e < len; ++e) b[e] = static_cast<acc_t>(base[s + e]);
      block_counts<in_t, acc_t>(b, xs, s, len, eps, count);
      for (int64_t i = 0; i < m; ++i) {
        int64_t shared = 0, unique = 0;
        for (int64_t e = 0; e < len; ++e) {
          const bool counted = std::abs(static_cast<acc_t>(xs[i][s + e]) - b[e]) > eps;
          shared += counted & (count[e] > 1);
          unique += counted & (count[e] == 1);
        }
        local[2 * i] += shared;
        local[2 * i + 1] += unique;
      }
    }
#pragma omp critical
    for (int64_t j = 0; j < 2 * m; ++j) total[j] += local[j];
  }
  return total;
}

template <typename in_t, typename acc_t, typename out_t>
void ram_impl(const in_t* base, const std::vector<const in_t*>& xs, acc_t eps, const std::vector<acc_t>& scales,
              out_t* out, int64_t n) {
  const int64_t m = static_cast<int64_t>(xs.size());
  const bool scaled = !scales.empty();
#pragma omp parallel for schedule(dynamic, 16) if (n > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
    const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
    acc_t b[kBlock], sum[kBlock], divisor[kBlock];
    int32_t count[kBlock];
    for (int64_t e = 0; e < len; ++e) b[e] = static_cast<acc_t>(base[s + e]);
    block_counts<in_t, acc_t>(b, xs, s, len, eps, count);
    for (int64_t e = 0; e < len; ++e) divisor[e] = static_cast<acc_t>(count[e]);
    for (int64_t e = 0; e < len; ++e) sum[e] = acc_t(0);
    for (int64_t i = 0; i < m; ++i) {
      const in_t* x = xs[i] + s;
      const acc_t scale = scaled ? scales[i] : acc_t(1);
      for (int64_t e = 0; e < len; ++e) {
        const acc_t d = static_cast<acc_t>(x[e]) - b[e];
        const bool counted = std::abs(d) > eps;
        const acc_t unique = scaled ? d * scale : d;
        const acc_t v = count[e] == 1 ? unique : d / divisor[e];
        sum[e] += cpu::select_or_zero(counted, v);
      }
    }
    for (int64_t e = 0; e < len; ++e) out[s + e] = static_cast<out_t>(b[e] + sum[e]);
  }
}

}  // namespace

void nearswap_cpu(const torch::Tensor& base, const torch::Tensor& x, double t, torch::Tensor& out) {
  NOVA_EXTRA_DISPATCH(base.scalar_type(), out.scalar_type(), "nearswap_cpu", [&] {
    nearswap_impl<in_t, acc_t, out_t>(base.data_ptr<in_t>(), x.data_ptr<in_t>(), static_cast<acc_t>(t),
                                      out.data_ptr<out_t>(), base.numel());
  });
}

std::vector<int64_t> ram_counts_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps) {
  std::vector<int64_t> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "ram_counts_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : xs) ptrs.push_back(x.data_ptr<scalar_t>());
    result = ram_counts_impl<scalar_t, acc_t>(base.data_ptr<scalar_t>(), ptrs, static_cast<acc_t>(eps), base.numel());
  });
  return result;
}

void ram_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps,
             const std::vector<double>& scales, torch::Tensor& out) {
  NOVA_EXTRA_DISPATCH(base.scalar_type(), out.scalar_type(), "ram_cpu", [&] {
    std::vector<const in_t*> ptrs;
    for (const auto& x : xs) ptrs.push_back(x.data_ptr<in_t>());
    std::vector<acc_t> acc_scales(scales.begin(), scales.end());
    ram_impl<in_t, acc_t, out_t>(base.data_ptr<in_t>(), ptrs, static_cast<acc_t>(eps), acc_scales,
                                 out.data_ptr<out_t>(), base.numel());
  });
}

}  // namespace nova_rt
