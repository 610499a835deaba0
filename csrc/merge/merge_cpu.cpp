// CPU implementation of the merge ops (see merge.h for the math). OpenMP over fixed 1024-element blocks; inside a
// block the loops run model-outer / element-inner over a stack accumulator so the compiler can vectorise them.
// TIES thresholds use a radix select over the magnitude bits (two parallel histogram passes for fp32), so they need
// no per-tensor scratch: an nth_element copy would be 2x a bf16 tensor (the 0.5B embedding: 545 MB).
// Accumulation is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64); reductions (SLERP, Model Stock) sum fp32 block
// partials into fp64 so the result does not drift with tensor size.
#include "merge.h"

#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace nova_rt {
namespace {

constexpr int64_t kBlock = 1024;
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements, threads cost more than they save
constexpr int64_t kChunks = 256;           // reduction chunks (fixed, so sums do not depend on the thread count)

// Nested dtype dispatch: defines in_t, out_t and acc_t (fp32, or fp64 for fp64 inputs) for the body.
#define NOVA_DISPATCH_IN_OUT(IN_TYPE, OUT_TYPE, NAME, ...)                                                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, IN_TYPE, NAME, [&] {                              \
    using in_t = scalar_t;                                                                                     \
    using acc_t = at::opmath_type<in_t>;                                                                       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, OUT_TYPE, NAME, [&] {                           \
      using out_t = scalar_t;                                                                                  \
      __VA_ARGS__();                                                                                           \
    });                                                                                                        \
  })

template <typename T>
std::vector<const T*> data_ptrs(const std::vector<torch::Tensor>& xs) {
  std::vector<const T*> ptrs;
  ptrs.reserve(xs.size());
  for (const auto& x : xs) ptrs.push_back(x.data_ptr<T>());
  return ptrs;
}

int64_t n_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

template <typename in_t, typename acc_t, typename out_t>
void weighted_sum_impl(const std::vector<const in_t*>& xs, const std::vector<acc_t>& w, acc_t scale, out_t* out,
                       int64_t n) {
  const int64_t n_models = static_cast<int64_t>(xs.size());
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
    const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
    acc_t acc[kBlock];
    for (int64_t e = 0; e < len; ++e) acc[e] = acc_t(0);
    for (int64_t i = 0; i < n_models; ++i) {
      const in_t* x = xs[i] + s;
      const acc_t wi = w[i];
      for (int64_t e = 0; e < len; ++e) acc[e] += wi * static_cast<acc_t>(x[e]);
    }
    for (int64_t e = 0; e < len; ++e) out[s + e] = static_cast<out_t>(acc[e] * scale);
  }
}

// Keep test of one element of model i's task vector (magnitude or random mode; kNone keeps everything).
template <typename acc_t>
inline bool keep_elem(Sparsify mode, const SparsifyParam& p, acc_t d, int64_t e) {
  if (mode == Sparsify::kMagnitude) {
    const double ad = std::abs(static_cast<double>(d));
    return ad > p.thr || (ad == p.thr && e < p.cutoff);
  }
  if (mode == Sparsify::kRandom) return dare_keep(p.stream, e, p.density);
  return true;
}

template <typename in_t, typename acc_t, typename out_t>
void gta_impl(const in_t* base, const std::vector<const in_t*>& xs, const GtaArgs& args,
              const std::vector<SparsifyParam>& sp, out_t* out, int64_t n) {
  const int64_t n_models = static_cast<int64_t>(xs.size());
  const acc_t lambda = static_cast<acc_t>(args.lambda);
  const acc_t linear_div = static_cast<acc_t>(gta_linear_divisor(args));  // sum(w) or 1
  std::vector<acc_t> w(args.weights.begin(), args.weights.end());
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<acc_t> buf(args.consensus ? n_models * kBlock : 0);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
      const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
      acc_t sum[kBlock], div[kBlock];
      for (int64_t e = 0; e < len; ++e) sum[e] = acc_t(0);
      for (int64_t i = 0; i < n_models; ++i) {
        const in_t* x = xs[i] + s;
        const SparsifyParam& p = sp[i];
        for (int64_t e = 0; e < len; ++e) {
          const acc_t d = static_cast<acc_t>(x[e]) - static_cast<acc_t>(base[s + e]);
          const acc_t v = keep_elem(args.sparsify, p, d, s + e) ? w[i] * (d * static_cast<acc_t>(p.scale)) : acc_t(0);
          sum[e] += v;
          if (args.consensus) buf[i * kBlock + e] = v;
        }
      }
      if (args.consensus) {
        for (int64_t e = 0; e < len; ++e) div[e] = acc_t(0);
        for (int64_t e = 0; e < len; ++e) {
          const bool pos = sum[e] >= acc_t(0);
          acc_t mix = acc_t(0), dv = acc_t(0);
          for (int64_t i = 0; i < n_models; ++i) {
            const acc_t v = buf[i * kBlock + e];
            const bool agree = pos ? v > acc_t(0) : v < acc_t(0);
            mix += agree ? v : acc_t(0);
            dv += agree ? w[i] : acc_t(0);
          }
          sum[e] = mix;
          div[e] = (!args.normalize || dv == acc_t(0)) ? acc_t(1) : dv;
        }
      } else {
        for (int64_t e = 0; e < len; ++e) div[e] = linear_div;
      }
      for (int64_t e = 0; e < len; ++e)
        out[s + e] = static_cast<out_t>(static_cast<acc_t>(base[s + e]) + sum[e] / div[e] * lambda);
    }
  }
}

// Magnitudes |x - base| as unsigned integers: for non-negative IEEE floats the bit pattern orders like the value,
// so the k-th largest magnitude can be found digit by digit (radix select) without a copy of the tensor.
template <typename acc_t>
struct MagBits;
template <>
struct MagBits<float> {
  using U = uint32_t;
};
template <>
struct MagBits<double> {
  using U = uint64_t;
};

template <typename in_t, typename acc_t>
inline typename MagBits<acc_t>::U mag_bits(const in_t* x, const in_t* base, int64_t e) {
  const acc_t ad = std::abs(static_cast<acc_t>(x[e]) - static_cast<acc_t>(base[e]));
  typename MagBits<acc_t>::U u;
  std::memcpy(&u, &ad, sizeof(u));
  return u;
}

// Histogram of one 16-bit digit (at `shift`) over the elements whose higher digits equal `prefix`.
template <typename in_t, typename acc_t, typename U>
std::vector<int64_t> digit_histogram(const in_t* base, const in_t* x, int64_t n, int shift, U hi_mask, U prefix) {
  constexpr int64_t kBins = 1 << 16;
  std::vector<int64_t> hist(kBins, 0);
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<int64_t> local(kBins, 0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      const U u = mag_bits<in_t, acc_t>(x, base, e);
      if ((u & hi_mask) == prefix) ++local[(u >> shift) & (kBins - 1)];
    }
#pragma omp critical
    for (int64_t b = 0; b < kBins; ++b) hist[b] += local[b];
  }
  return hist;
}

// 1 + flat index of the need-th element (in index order) whose magnitude bits equal `bits`.
template <typename in_t, typename acc_t, typename U>
int64_t nth_equal_index(const in_t* base, const in_t* x, int64_t n, U bits, int64_t need) {
  const int64_t nc = std::max<int64_t>(1, std::min(n_blocks(n), kChunks));
  std::vector<int64_t> counts(nc, 0);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t e = n * c / nc; e < n * (c + 1) / nc; ++e) counts[c] += mag_bits<in_t, acc_t>(x, base, e) == bits;
  for (int64_t c = 0; c < nc; ++c) {
    if (counts[c] < need) {
      need -= counts[c];
      continue;
    }
    for (int64_t e = n * c / nc; e < n * (c + 1) / nc; ++e)
      if (mag_bits<in_t, acc_t>(x, base, e) == bits && --need == 0) return e + 1;
  }
  return n;
}

// Top-k threshold of |x - base| by radix select on the magnitude bits (16 bits per pass, no scratch copy), then the
// flat index cutoff that keeps exactly k (elements equal to the threshold are taken in index order).
template <typename in_t, typename acc_t>
SparsifyParam magnitude_param(const in_t* base, const in_t* x, int64_t n, double density) {
  using U = typename MagBits<acc_t>::U;
  constexpr int kBits = 8 * sizeof(U);
  SparsifyParam p{-1.0, 0, density, 1.0f, 0};
  const int64_t k = magnitude_k(density, n);
  if (k >= n) return p;  // thr = -1 keeps everything
  if (k == 0) {
    p.thr = std::numeric_limits<double>::infinity();
    return p;
  }
  U prefix = 0;
  int64_t need = k;  // elements still to take among those matching the digits fixed so far
  for (int shift = kBits - 16; shift >= 0; shift -= 16) {
    const U hi_mask = shift + 16 >= kBits ? U(0) : ~U(0) << (shift + 16);
    const auto hist = digit_histogram<in_t, acc_t, U>(base, x, n, shift, hi_mask, prefix);
    int64_t bin = (1 << 16) - 1;
    for (; bin > 0 && hist[bin] < need; --bin) need -= hist[bin];
    prefix |= static_cast<U>(bin) << shift;
  }
  acc_t thr;
  std::memcpy(&thr, &prefix, sizeof(thr));
  p.thr = static_cast<double>(thr);
  p.cutoff = nth_equal_index<in_t, acc_t, U>(base, x, n, prefix, need);
  return p;
}

// Deterministic fp64 sums of K per-block partials over [begin, end): the range is cut into at most kChunks chunks
// that do not depend on the thread count, and chunk partials are added in order, so results are reproducible.
// block_fn(s, len, acc) adds its block's K partials into acc[0..K).
template <typename F>
std::vector<double> chunked_sums(int64_t begin, int64_t end, int64_t k, bool parallel, F&& block_fn) {
  const int64_t nb = n_blocks(end - begin), nc = std::min(nb, kChunks);
  std::vector<double> part(nc * k, 0.0);
#pragma omp parallel for schedule(static) if (parallel && end - begin > kParallelMin)
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t blk = nb * c / nc; blk < nb * (c + 1) / nc; ++blk) {
      const int64_t s = begin + blk * kBlock;
      block_fn(s, std::min(kBlock, end - s), &part[c * k]);
    }
  }
  std::vector<double> total(k, 0.0);
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t j = 0; j < k; ++j) total[j] += part[c * k + j];
  return total;
}

// <x, y> over one block with 16 independent lanes: vectorises without -ffast-math (no reassociation needed).
template <typename T>
double dot_lanes(const T* x, const T* y, int64_t len) {
  constexpr int kLanes = 16;
  T lanes[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[e + l] * y[e + l];
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; e < len; ++e) total += static_cast<double>(x[e]) * static_cast<double>(y[e]);
  return total;
}

// |a|^2, |b|^2 and <a, b> of one block, added into acc[0..3).
template <typename in_t, typename acc_t>
void slerp_block_sums(const in_t* pa, const in_t* pb, int64_t len, double* acc) {
  acc_t x[kBlock], y[kBlock];
  for (int64_t e = 0; e < len; ++e) x[e] = static_cast<acc_t>(pa[e]);
  for (int64_t e = 0; e < len; ++e) y[e] = static_cast<acc_t>(pb[e]);
  acc[0] += dot_lanes(x, x, len);
  acc[1] += dot_lanes(y, y, len);
  acc[2] += dot_lanes(x, y, len);
}

template <typename in_t, typename acc_t, typename out_t>
void axpby_impl(const in_t* pa, const in_t* pb, acc_t fa, acc_t fb, out_t* out, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t e = 0; e < n; ++e)
    out[e] = static_cast<out_t>(fa * static_cast<acc_t>(pa[e]) + fb * static_cast<acc_t>(pb[e]));
}

}  // namespace

int64_t magnitude_k(double density, int64_t numel) {
  if (density >= 1.0) return numel;
  if (density <= 0.0 || numel == 0) return 0;
  return std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(numel)));
}

std::vector<SparsifyParam> random_params(const GtaArgs& args, int64_t n_models) {
  std::vector<SparsifyParam> sp;
  for (int64_t i = 0; i < n_models; ++i) {
    const double d = args.densities[i];
    const float scale = (args.rescale && d > 0.0 && d < 1.0) ? static_cast<float>(1.0 / d) : 1.0f;
    sp.push_back({-1.0, 0, d, scale, dare_stream(args.seed, args.tensor_id, i)});
  }
  return sp;
}

double gta_linear_divisor(const GtaArgs& args) {
  double wsum = 0.0;
  for (double w : args.weights) wsum += w;
  return (args.normalize && !args.consensus && std::abs(wsum) >= 1e-8) ? wsum : 1.0;
}

torch::Tensor weighted_sum_cpu(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                               at::ScalarType out_dtype) {
  auto out = torch::empty(xs[0].sizes(), xs[0].options().dtype(out_dtype));
  const int64_t n = xs[0].numel();
  NOVA_DISPATCH_IN_OUT(xs[0].scalar_type(), out_dtype, "weighted_sum_cpu", [&] {
    std::vector<acc_t> w(weights.begin(), weights.end());
    weighted_sum_impl<in_t, acc_t, out_t>(data_ptrs<in_t>(xs), w, static_cast<acc_t>(scale), out.data_ptr<out_t>(), n);
  });
  return out;
}

std::vector<SparsifyParam> magnitude_params_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                                const std::vector<double>& densities) {
  std::vector<SparsifyParam> sp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "magnitude_params_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (size_t i = 0; i < xs.size(); ++i)
      sp.push_back(magnitude_param<scalar_t, acc_t>(base.data_ptr<scalar_t>(), xs[i].data_ptr<scalar_t>(),
                                                    base.numel(), densities[i]));
  });
  return sp;
}

torch::Tensor gta_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const GtaArgs& args,
                      at::ScalarType out_dtype) {
  const int64_t n = base.numel(), n_models = static_cast<int64_t>(xs.size());
  std::vector<SparsifyParam> sp;
  if (args.sparsify == Sparsify::kMagnitude) {
    sp = magnitude_params_cpu(base, xs, args.densities);
  } else if (args.sparsify == Sparsify::kRandom) {
    sp = random_params(args, n_models);
  } else {
    sp.assign(n_models, SparsifyParam{-1.0, 0, 1.0, 1.0f, 0});
  }
  auto out = torch::empty(base.sizes(), base.options().dtype(out_dtype));
  NOVA_DISPATCH_IN_OUT(base.scalar_type(), out_dtype, "gta_cpu", [&] {
    gta_impl<in_t, acc_t, out_t>(base.data_ptr<in_t>(), data_ptrs<in_t>(xs), args, sp, out.data_ptr<out_t>(), n);
  });
  return out;
}

torch::Tensor slerp_cpu(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
                        at::ScalarType out_dtype) {
  const int64_t n = a.numel();
  auto out = torch::empty(a.sizes(), a.options().dtype(out_dtype));
  NOVA_DISPATCH_IN_OUT(a.scalar_type(), out_dtype, "slerp_cpu", [&] {
    const in_t* pa = a.data_ptr<in_t>();
    const in_t* pb = b.data_ptr<in_t>();
    // One pass for |a|^2, |b|^2 and <a, b>.
    const auto sums = chunked_sums(0, n, 3, true, [&](int64_t s, int64_t len, double* acc) {
      slerp_block_sums<in_t, acc_t>(pa + s, pb + s, len, acc);
    });
    double ca = 1.0 - t, cb = t;
    slerp_coefficients(sums[0], sums[1], sums[2], t, dot_threshold, eps, &ca, &cb);
    axpby_impl<in_t, acc_t, out_t>(pa, pb, static_cast<acc_t>(ca), static_cast<acc_t>(cb), out.data_ptr<out_t>(), n);
  });
  return out;
}

namespace {

// t of one Model Stock row from its Gram entries g[i][j] = <tau_i, tau_j> (row-major n_models x n_models).
double model_stock_t(const std::vector<double>& g, int64_t n_models) {
  double cos_sum = 0.0;
  int64_t pairs = 0;
  for (int64_t i = 0; i < n_models; ++i) {
    for (int64_t j = i + 1; j < n_models; ++j, ++pairs) {
      const double norm = std::sqrt(g[i * n_models + i]) * std::sqrt(g[j * n_models + j]);
      cos_sum += std::min(1.0, std::max(-1.0, g[i * n_models + j] / std::max(norm, 1e-6)));
    }
  }
  const double c = cos_sum / static_cast<double>(pairs);
  const double den = 1.0 + static_cast<double>(n_models - 1) * c;
  return std::abs(den) < 1e-6 ? 0.0 : static_cast<double>(n_models) * c / den;
}

// Gram matrix of the task vectors over [s, s + len) in one pass over the inputs.
template <typename in_t, typename acc_t>
std::vector<double> task_gram(const in_t* base, const std::vector<const in_t*>& xs, int64_t s, int64_t len,
                              bool parallel) {
  const int64_t m = static_cast<int64_t>(xs.size());
  auto flat = chunked_sums(s, s + len, m * m, parallel, [&](int64_t b0, int64_t blen, double* acc) {
    std::vector<acc_t> d(m * kBlock);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t e = 0; e < blen; ++e)
        d[i * kBlock + e] = static_cast<acc_t>(xs[i][b0 + e]) - static_cast<acc_t>(base[b0 + e]);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i; j < m; ++j) acc[i * m + j] += dot_lanes(&d[i * kBlock], &d[j * kBlock], blen);
  });
  return flat;
}

template <typename in_t, typename acc_t, typename out_t>
void model_stock_impl(const in_t* base, const std::vector<const in_t*>& xs, int64_t rows, int64_t cols, out_t* out) {
  const int64_t n_models = static_cast<int64_t>(xs.size());
  const bool rows_parallel = rows >= 4 * omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 16) if (rows_parallel && rows * cols > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = r * cols;
    const acc_t t = static_cast<acc_t>(model_stock_t(task_gram<in_t, acc_t>(base, xs, s, cols, !rows_parallel), n_models));
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n_models);
#pragma omp parallel for schedule(static) if (!rows_parallel && cols > kParallelMin)
    for (int64_t blk = 0; blk < n_blocks(cols); ++blk) {
      const int64_t b0 = s + blk * kBlock, len = std::min(kBlock, s + cols - b0);
      acc_t acc[kBlock];
      for (int64_t e = 0; e < len; ++e) acc[e] = acc_t(0);
      for (int64_t i = 0; i < n_models; ++i)
        for (int64_t e = 0; e < len; ++e) acc[e] += static_cast<acc_t>(xs[i][b0 + e]);
      for (int64_t e = 0; e < len; ++e)
        out[b0 + e] = static_cast<out_t>(t * (acc[e] * inv_n) + (acc_t(1) - t) * static_cast<acc_t>(base[b0 + e]));
    }
  }
}

}  // namespace

torch::Tensor model_stock_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                              at::ScalarType out_dtype) {
  const int64_t n = base.numel();
  const int64_t cols = row_len > 0 ? row_len : std::max<int64_t>(n, 1);
  const int64_t rows = n == 0 ? 0 : n / cols;
  auto out = torch::empty(base.sizes(), base.options().dtype(out_dtype));
  NOVA_DISPATCH_IN_OUT(base.scalar_type(), out_dtype, "model_stock_cpu", [&] {
    model_stock_impl<in_t, acc_t, out_t>(base.data_ptr<in_t>(), data_ptrs<in_t>(xs), rows, cols,
                                         out.data_ptr<out_t>());
  });
  return out;
}

}  // namespace nova_rt
