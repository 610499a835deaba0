// CPU implementation of the merge ops (see merge.h for the math). OpenMP over fixed 1024-element blocks; inside a
// block the loops run model-outer / element-inner over a stack accumulator so the compiler can vectorise them.
// Loops use dynamic scheduling: on a shared machine a descheduled thread then delays a barrier by one chunk, not
// half the tensor. Every op writes into a caller-provided output (the streaming merge passes a view of the output
// file's mapping, so no output tensor is ever allocated and faulted in). TIES thresholds come from topk_cpu.cpp.
// Accumulation is fp32 for fp16/bf16/fp32 inputs (fp64 for fp64); reductions (SLERP, Model Stock) sum fp32 block
// partials into fp64 so the result does not drift with tensor size.
#include "merge_cpu.h"

#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace nova_rt {
namespace {

using cpu::kBlock;
using cpu::kChunks;
using cpu::kParallelMin;
using cpu::n_blocks;

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

template <typename in_t, typename acc_t, typename out_t>
void weighted_sum_impl(const std::vector<const in_t*>& xs, const std::vector<acc_t>& w, acc_t scale, out_t* out,
                       int64_t n) {
  const int64_t n_models = static_cast<int64_t>(xs.size());
#pragma omp parallel for schedule(dynamic, 16) if (n > kParallelMin)
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

// Per-model parameters of gta's element loop: weight, DARE rescale, and the keep rule of the sparsifier.
template <typename acc_t>
struct GtaModel {
  acc_t w;
  acc_t scale;
  cpu::MagKeep<acc_t> mag;  // kMagnitude
  double density;           // kRandom
  uint64_t stream;          // kRandom
};

// Branch-free (bitwise, not short-circuit) so the element loop vectorises: keep decisions are close to random.
template <Sparsify kMode, typename acc_t>
inline bool keep_elem(const GtaModel<acc_t>& p, acc_t d, int64_t e) {
  if constexpr (kMode == Sparsify::kMagnitude) {
    const auto u = cpu::mag_bits<acc_t>(d);
    return (u > p.mag.thr) | ((u == p.mag.thr) & (e < p.mag.cutoff));
  } else if constexpr (kMode == Sparsify::kRandom) {
    return dare_keep(p.stream, e, p.density);
  } else {
    return true;
  }
}

// Templated on the sparsifier and consensus so each variant's inner loop has no per-element mode branches.
template <typename in_t, typename acc_t, typename out_t, Sparsify kMode, bool kConsensus>
void gta_impl(const in_t* base, const std::vector<const in_t*>& xs, const std::vector<GtaModel<acc_t>>& models,
              acc_t lambda, acc_t linear_div, bool normalize, out_t* out, int64_t n, int64_t offset) {
  const int64_t n_models = static_cast<int64_t>(xs.size());
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<acc_t> buf(kConsensus ? n_models * kBlock : 0);
#pragma omp for schedule(dynamic, 16)
    for (int64_t blk = 0; blk < n_blocks(n); ++blk) {
      const int64_t s = blk * kBlock, len = std::min(kBlock, n - s);
      acc_t b[kBlock], sum[kBlock], div[kBlock];
      for (int64_t e = 0; e < len; ++e) b[e] = static_cast<acc_t>(base[s + e]);
      for (int64_t e = 0; e < len; ++e) sum[e] = acc_t(0);
      for (int64_t i = 0; i < n_models; ++i) {
        const in_t* x = xs[i] + s;
        const GtaModel<acc_t> p = models[i];
        for (int64_t e = 0; e < len; ++e) {
          const acc_t d = static_cast<acc_t>(x[e]) - b[e];
          const acc_t v = cpu::select_or_zero(keep_elem<kMode>(p, d, offset + s + e), p.w * (d * p.scale));
          sum[e] += v;
          if constexpr (kConsensus) buf[i * kBlock + e] = v;
        }
      }
      if constexpr (kConsensus) {
        // v agrees with the elected sign iff sign * v > 0 (sign = +1 when sum >= 0, else -1; exact, and false for
        // v = 0 and NaN as the comparisons it replaces). Model-outer loops over element arrays vectorise.
        acc_t sign[kBlock], mix[kBlock];
        for (int64_t e = 0; e < len; ++e) sign[e] = sum[e] >= acc_t(0) ? acc_t(1) : acc_t(-1);
        for (int64_t e = 0; e < len; ++e) mix[e] = acc_t(0);
        for (int64_t e = 0; e < len; ++e) div[e] = acc_t(0);
        for (int64_t i = 0; i < n_models; ++i) {
          const acc_t* v = &buf[i * kBlock];
          const acc_t w = models[i].w;
          for (int64_t e = 0; e < len; ++e) {
            const bool agree = sign[e] * v[e] > acc_t(0);
            mix[e] += cpu::select_or_zero(agree, v[e]);
            div[e] += cpu::select_or_zero(agree, w);
          }
        }
        for (int64_t e = 0; e < len; ++e) sum[e] = mix[e];
        for (int64_t e = 0; e < len; ++e) div[e] = (!normalize || div[e] == acc_t(0)) ? acc_t(1) : div[e];
      } else {
        for (int64_t e = 0; e < len; ++e) div[e] = linear_div;
      }
      for (int64_t e = 0; e < len; ++e) out[s + e] = static_cast<out_t>(b[e] + sum[e] / div[e] * lambda);
    }
  }
}

template <typename in_t, typename acc_t, typename out_t>
void gta_dispatch(const in_t* base, const std::vector<const in_t*>& xs, const GtaArgs& args,
                  const std::vector<GtaModel<acc_t>>& models, out_t* out, int64_t n) {
  const auto lambda = static_cast<acc_t>(args.lambda);
  const auto linear_div = static_cast<acc_t>(gta_linear_divisor(args));  // sum(w) or 1
  const auto run = [&](auto mode, auto consensus) {
    gta_impl<in_t, acc_t, out_t, decltype(mode)::value, decltype(consensus)::value>(base, xs, models, lambda,
                                                                                    linear_div, args.normalize,
                                                                                    out, n, args.offset);
  };
  using kNone = std::integral_constant<Sparsify, Sparsify::kNone>;
  using kMag = std::integral_constant<Sparsify, Sparsify::kMagnitude>;
  using kRand = std::integral_constant<Sparsify, Sparsify::kRandom>;
  const bool c = args.consensus;
  switch (args.sparsify) {
    case Sparsify::kMagnitude:
      return c ? run(kMag{}, std::true_type{}) : run(kMag{}, std::false_type{});
    case Sparsify::kRandom:
      return c ? run(kRand{}, std::true_type{}) : run(kRand{}, std::false_type{});
    default:
      return c ? run(kNone{}, std::true_type{}) : run(kNone{}, std::false_type{});
  }
}

// Deterministic fp64 sums of K per-block partials over [begin, end): the range is cut into at most kChunks chunks
// that do not depend on the thread count, and chunk partials are added in order, so results are reproducible.
// block_fn(s, len, acc) adds its block's K partials into acc[0..K).
template <typename F>
std::vector<double> chunked_sums(int64_t begin, int64_t end, int64_t k, bool parallel, F&& block_fn) {
  const int64_t nb = n_blocks(end - begin), nc = std::min(nb, kChunks);
  std::vector<double> part(nc * k, 0.0);
#pragma omp parallel for schedule(dynamic, 1) if (parallel && end - begin > kParallelMin)
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
#pragma omp parallel for schedule(dynamic, 16384) if (n > kParallelMin)
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

void weighted_sum_cpu(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                      torch::Tensor& out) {
  const int64_t n = xs[0].numel();
  NOVA_DISPATCH_IN_OUT(xs[0].scalar_type(), out.scalar_type(), "weighted_sum_cpu", [&] {
    std::vector<acc_t> w(weights.begin(), weights.end());
    weighted_sum_impl<in_t, acc_t, out_t>(data_ptrs<in_t>(xs), w, static_cast<acc_t>(scale), out.data_ptr<out_t>(), n);
  });
}

std::vector<SparsifyParam> magnitude_params_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                                const std::vector<double>& densities, bool sampled) {
  std::vector<SparsifyParam> sp;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "magnitude_params_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using S = typename cpu::MagBits<acc_t>::S;
    const auto keep = cpu::magnitude_keep<scalar_t, acc_t>(base.data_ptr<scalar_t>(), data_ptrs<scalar_t>(xs),
                                                           base.numel(), densities, sampled);
    for (size_t i = 0; i < xs.size(); ++i) {
      const auto& m = keep[i];
      double thr = -1.0;  // keep all
      if (m.cutoff == 0 && m.thr == std::numeric_limits<S>::max()) {
        thr = std::numeric_limits<double>::infinity();  // keep none
      } else if (m.thr != 0 || m.cutoff != std::numeric_limits<int64_t>::max()) {
        acc_t v;
        std::memcpy(&v, &m.thr, sizeof(v));
        thr = static_cast<double>(v);
      }
      sp.push_back({thr, m.cutoff == std::numeric_limits<int64_t>::max() ? 0 : m.cutoff, densities[i], 1.0f, 0});
    }
  });
  return sp;
}

void gta_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const GtaArgs& args,
             torch::Tensor& out) {
  const int64_t n = base.numel(), n_models = static_cast<int64_t>(xs.size());
  NOVA_DISPATCH_IN_OUT(base.scalar_type(), out.scalar_type(), "gta_cpu", [&] {
    const auto ptrs = data_ptrs<in_t>(xs);
    std::vector<GtaModel<acc_t>> models(n_models);
    for (int64_t i = 0; i < n_models; ++i) {
      models[i].w = static_cast<acc_t>(args.weights[i]);
      models[i].scale = acc_t(1);
    }
    if (args.sparsify == Sparsify::kMagnitude && !args.mag_thr.empty()) {
      using S = typename cpu::MagBits<acc_t>::S;  // the whole tensor's keep rules (blocked merging)
      for (int64_t i = 0; i < n_models; ++i) models[i].mag = {static_cast<S>(args.mag_thr[i]), args.mag_cutoff[i]};
    } else if (args.sparsify == Sparsify::kMagnitude) {
      const auto keep = cpu::magnitude_keep<in_t, acc_t>(base.data_ptr<in_t>(), ptrs, n, args.densities, true);
      for (int64_t i = 0; i < n_models; ++i) models[i].mag = keep[i];
    } else if (args.sparsify == Sparsify::kRandom) {
      const auto sp = random_params(args, n_models);
      for (int64_t i = 0; i < n_models; ++i) {
        models[i].scale = static_cast<acc_t>(sp[i].scale);
        models[i].density = sp[i].density;
        models[i].stream = sp[i].stream;
      }
    }
    gta_dispatch<in_t, acc_t, out_t>(base.data_ptr<in_t>(), ptrs, args, models, out.data_ptr<out_t>(), n);
  });
}

void slerp_cpu(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
               torch::Tensor& out, const std::vector<double>& sums_given) {
  const int64_t n = a.numel();
  NOVA_DISPATCH_IN_OUT(a.scalar_type(), out.scalar_type(), "slerp_cpu", [&] {
    const in_t* pa = a.data_ptr<in_t>();
    const in_t* pb = b.data_ptr<in_t>();
    // One pass for |a|^2, |b|^2 and <a, b>.
    const auto sums = !sums_given.empty() ? sums_given : chunked_sums(0, n, 3, true, [&](int64_t s, int64_t len,
                                                                                           double* acc) {
      slerp_block_sums<in_t, acc_t>(pa + s, pb + s, len, acc);
    });
    double ca = 1.0 - t, cb = t;
    slerp_coefficients(sums[0], sums[1], sums[2], t, dot_threshold, eps, &ca, &cb);
    axpby_impl<in_t, acc_t, out_t>(pa, pb, static_cast<acc_t>(ca), static_cast<acc_t>(cb), out.data_ptr<out_t>(), n);
  });
}

int64_t slerp_chunks(int64_t n_total) { return std::min(n_blocks(n_total), kChunks); }

namespace {

// Adds the 1024-element blocks g0 <= g < g1 (block g at pa + g * kBlock - offset) into the fixed chunks of an
// n_total-element tensor: chunk c owns the same blocks as in chunked_sums over the whole tensor and blocks arrive in
// order, so each chunk's partial adds its blocks in the same order as the whole-tensor pass.
template <typename in_t, typename acc_t>
void slerp_partials_impl(const in_t* pa, const in_t* pb, int64_t offset, int64_t n, int64_t n_total, double* acc) {
  const int64_t nb = n_blocks(n_total), nc = std::min(nb, kChunks);
  const int64_t g0 = offset / kBlock, g1 = n_blocks(offset + n);
#pragma omp parallel for schedule(dynamic, 1) if (n > kParallelMin)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t lo = std::max(nb * c / nc, g0), hi = std::min(nb * (c + 1) / nc, g1);
    for (int64_t g = lo; g < hi; ++g) {
      const int64_t s = g * kBlock - offset;
      slerp_block_sums<in_t, acc_t>(pa + s, pb + s, std::min(kBlock, n - s), &acc[c * 3]);
    }
  }
}

}  // namespace

void slerp_partials_cpu(const torch::Tensor& a, const torch::Tensor& b, int64_t offset, int64_t n_total,
                        torch::Tensor& part) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "slerp_partials_cpu", [&] {
    slerp_partials_impl<scalar_t, at::opmath_type<scalar_t>>(a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), offset,
                                                             a.numel(), n_total, part.data_ptr<double>());
  });
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
    thread_local std::vector<acc_t> d;  // per-thread scratch: no allocation per 1024-element block
    d.resize(m * kBlock);
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
#pragma omp parallel for schedule(dynamic, 16) if (!rows_parallel && cols > kParallelMin)
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

void model_stock_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                     torch::Tensor& out) {
  const int64_t n = base.numel();
  const int64_t cols = row_len > 0 ? row_len : std::max<int64_t>(n, 1);
  const int64_t rows = n == 0 ? 0 : n / cols;
  NOVA_DISPATCH_IN_OUT(base.scalar_type(), out.scalar_type(), "model_stock_cpu", [&] {
    model_stock_impl<in_t, acc_t, out_t>(base.data_ptr<in_t>(), data_ptrs<in_t>(xs), rows, cols,
                                         out.data_ptr<out_t>());
  });
}

}  // namespace nova_rt
