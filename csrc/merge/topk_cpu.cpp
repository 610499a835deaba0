// TIES magnitude sparsifier on CPU: for each model, the threshold and tie cutoff that keep exactly
// k = magnitude_k(density, n) elements of |x_i - base| (ties at the threshold broken by flat index), without a
// scratch copy of the tensor.
//
// Sampled bracket (default). A stratified sample of s = min(65536, n / 16) magnitudes per model gives the sample rank
// of the k-th largest, q = s k / n; the bracket [lo, hi] is the sample values at q -/+ (4 sd + 8) ranks (sd of the
// binomial rank count, sqrt(s p (1 - p))). One parallel pass over base and all models counts the magnitudes above hi,
// equal to hi and equal to lo, and collects those strictly inside (lo, hi) in index order per chunk (at most about
// 8 sd / s = 1.6% of n at s = 65536, p = 0.4; heavy ties, common in bf16 deltas, fall in the equal counts). The k-th
// largest is then hi, lo, or found by nth_element among the candidates, and the tie cutoff by a scan of one chunk or
// of the candidates. If it falls outside the bracket (probability ~1e-4 per model), that model uses the radix select.
// Tensors of at most 2^18 elements skip the sample: every magnitude is a candidate.
// Radix select (fallback). 16-bit digits of the magnitude bits, most significant first: a histogram pass per digit,
// then a counting pass for the cutoff (3 passes for fp32 accumulation, 5 for fp64).
// Measured (1 thread, 2026-11-21): a 4.36M-element bf16 tensor (the 0.5B benchmark's MLP weights), 2 models, density
// 0.4: sampled 5-7 ms, radix 20-21 ms. With the former radix-only selection and branchy element loop, TIES on it took
// 183 ms; now 13 ms.
#include "merge_cpu.h"

#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace nova_rt {
namespace cpu {
namespace {

constexpr int64_t kMaxSample = 1 << 16;
constexpr int64_t kAllCandidates = 1 << 18;  // up to this many elements every magnitude is a candidate

template <typename in_t, typename acc_t>
inline typename MagBits<acc_t>::S mag_at(const in_t* x, const in_t* base, int64_t e) {
  return mag_bits<acc_t>(static_cast<acc_t>(x[e]) - static_cast<acc_t>(base[e]));
}

template <typename S>
struct Candidate {
  S bits;
  uint32_t offset;  // element index minus the start of its chunk
};

// ---- radix select (fallback) ----

template <typename in_t, typename acc_t, typename U>
std::vector<int64_t> digit_histogram(const in_t* base, const in_t* x, int64_t n, int shift, U hi_mask, U prefix) {
  constexpr int64_t kBins = 1 << 16;
  std::vector<int64_t> hist(kBins, 0);
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<int64_t> local(kBins, 0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      const U u = static_cast<U>(mag_at<in_t, acc_t>(x, base, e));
      if ((u & hi_mask) == prefix) ++local[(u >> shift) & (kBins - 1)];
    }
#pragma omp critical
    for (int64_t b = 0; b < kBins; ++b) hist[b] += local[b];
  }
  return hist;
}

// 1 + flat index of the need-th element (in index order) whose magnitude bits equal `bits`.
template <typename in_t, typename acc_t, typename S>
int64_t nth_equal_index(const in_t* base, const in_t* x, int64_t n, S bits, int64_t need) {
  const int64_t nc = std::max<int64_t>(1, std::min(n_blocks(n), kChunks));
  std::vector<int64_t> counts(nc, 0);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t e = n * c / nc; e < n * (c + 1) / nc; ++e) counts[c] += mag_at<in_t, acc_t>(x, base, e) == bits;
  for (int64_t c = 0; c < nc; ++c) {
    if (counts[c] < need) {
      need -= counts[c];
      continue;
    }
    for (int64_t e = n * c / nc; e < n * (c + 1) / nc; ++e)
      if (mag_at<in_t, acc_t>(x, base, e) == bits && --need == 0) return e + 1;
  }
  return n;
}

template <typename in_t, typename acc_t>
MagKeep<acc_t> radix_keep(const in_t* base, const in_t* x, int64_t n, int64_t k) {
  using S = typename MagBits<acc_t>::S;
  using U = std::make_unsigned_t<S>;
  constexpr int kBits = 8 * sizeof(U);
  U prefix = 0;
  int64_t need = k;  // elements still to take among those matching the digits fixed so far
  for (int shift = kBits - 16; shift >= 0; shift -= 16) {
    const U hi_mask = shift + 16 >= kBits ? U(0) : ~U(0) << (shift + 16);
    const auto hist = digit_histogram<in_t, acc_t, U>(base, x, n, shift, hi_mask, prefix);
    int64_t bin = (1 << 16) - 1;
    for (; bin > 0 && hist[bin] < need; --bin) need -= hist[bin];
    prefix |= static_cast<U>(bin) << shift;
  }
  const S thr = static_cast<S>(prefix);
  return {thr, nth_equal_index<in_t, acc_t, S>(base, x, n, thr, need)};
}

// ---- sampled bracket ----

// [lo, hi] (magnitude bits) expected to contain the k-th largest of n magnitudes, from a stratified sample: one
// position drawn uniformly in each of s equal strata (a hash of the stratum), so strided structure cannot alias.
template <typename in_t, typename acc_t>
std::pair<typename MagBits<acc_t>::S, typename MagBits<acc_t>::S> sample_bracket(const in_t* base, const in_t* x,
                                                                                 int64_t n, int64_t k) {
  using S = typename MagBits<acc_t>::S;
  const int64_t s = std::min(kMaxSample, n / 16);
  std::vector<S> sample(s);
  for (int64_t j = 0; j < s; ++j) {
    const int64_t lo = n * j / s, width = n * (j + 1) / s - lo;
    const auto draw = static_cast<unsigned __int128>(splitmix64(static_cast<uint64_t>(j))) * static_cast<uint64_t>(width);
    const int64_t e = lo + static_cast<int64_t>(draw >> 64);  // uniform in [0, width) without a division
    sample[j] = mag_at<in_t, acc_t>(x, base, e);
  }
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double q = p * static_cast<double>(s);
  const double margin = 4.0 * std::sqrt(static_cast<double>(s) * p * (1.0 - p)) + 8.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(q - margin));  // 0-based ranks, descending order
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(q + margin));
  S hi = std::numeric_limits<S>::max(), lo = -1;  // no bound on that side
  auto desc = std::greater<S>();
  if (hi_rank >= 0) {
    std::nth_element(sample.begin(), sample.begin() + hi_rank, sample.end(), desc);
    hi = sample[hi_rank];
  }
  if (lo_rank < s) {
    const auto from = sample.begin() + std::max<int64_t>(hi_rank, 0);
    std::nth_element(from, sample.begin() + lo_rank, sample.end(), desc);
    lo = sample[lo_rank];
  }
  return {lo, hi};
}

// One chunk's view of one model's magnitudes against its bracket: counts above hi, equal to hi, equal to lo (when
// lo < hi), and the candidates strictly inside (lo, hi) in index order. Heavy ties (bf16 deltas take few distinct
// values: 10%+ of a tensor can share the threshold's value) land in the equal counts, not in the candidates.
template <typename S>
struct Tally {
  int64_t above = 0, eq_hi = 0, eq_lo = 0;
  std::vector<Candidate<S>> inside;
};

// One pass over base and every active model, chunk by chunk; tally[c * n_active + a].
template <typename in_t, typename acc_t>
void tally_bracket(const in_t* base, const std::vector<const in_t*>& xs, int64_t n,
                   const std::vector<typename MagBits<acc_t>::S>& lo, const std::vector<typename MagBits<acc_t>::S>& hi,
                   const std::vector<int64_t>& starts, std::vector<Tally<typename MagBits<acc_t>::S>>* tally) {
  using S = typename MagBits<acc_t>::S;
  const int64_t nc = static_cast<int64_t>(starts.size()), na = static_cast<int64_t>(xs.size());
#pragma omp parallel for schedule(dynamic, 1) if (n > kParallelMin)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t c0 = starts[c], c1 = c + 1 < nc ? starts[c + 1] : n;
    acc_t b[kBlock];
    S u[kBlock];
    for (int64_t s = c0; s < c1; s += kBlock) {
      const int64_t len = std::min(kBlock, c1 - s);
      for (int64_t e = 0; e < len; ++e) b[e] = static_cast<acc_t>(base[s + e]);
      for (int64_t a = 0; a < na; ++a) {
        const in_t* x = xs[a] + s;
        for (int64_t e = 0; e < len; ++e) u[e] = mag_bits<acc_t>(static_cast<acc_t>(x[e]) - b[e]);
        const S h = hi[a], l = lo[a];
        int32_t above = 0, eq_hi = 0, eq_lo = 0, inside = 0;  // per block (<= 1024): 32-bit lanes vectorise wider
        for (int64_t e = 0; e < len; ++e) {
          above += u[e] > h;
          eq_hi += u[e] == h;
          eq_lo += u[e] == l;
          inside += (u[e] > l) & (u[e] < h);
        }
        auto& t = (*tally)[c * na + a];
        t.above += above;
        t.eq_hi += eq_hi;
        t.eq_lo += l < h ? eq_lo : 0;
        // Candidates are ~1% of elements: test 16 at a time (vectorised), then compact a group without branches
        // (a data-dependent branch per element cost more than the rest of the pass).
        for (int64_t g = 0; g < len && inside > 0; g += 16) {
          const int64_t ge = std::min(len, g + 16);
          int any = 0;
          for (int64_t e = g; e < ge; ++e) any |= (u[e] > l) & (u[e] < h);
          if (!any) continue;
          Candidate<S> found[16];
          int m = 0;
          for (int64_t e = g; e < ge; ++e) {
            found[m] = {u[e], static_cast<uint32_t>(s + e - c0)};
            m += (u[e] > l) & (u[e] < h);
          }
          t.inside.insert(t.inside.end(), found, found + m);
          inside -= m;
        }
      }
    }
  }
}

// 1 + flat index of the need-th element equal to thr, given how many each chunk holds (count_of(c)).
template <typename in_t, typename acc_t, typename F>
int64_t nth_equal_in_chunks(const in_t* base, const in_t* x, int64_t n, const std::vector<int64_t>& starts,
                            typename MagBits<acc_t>::S thr, int64_t need, F&& count_of) {
  const int64_t nc = static_cast<int64_t>(starts.size());
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t cnt = count_of(c);
    if (cnt < need) {
      need -= cnt;
      continue;
    }
    const int64_t c1 = c + 1 < nc ? starts[c + 1] : n;
    for (int64_t e = starts[c]; e < c1; ++e)
      if (mag_at<in_t, acc_t>(x, base, e) == thr && --need == 0) return e + 1;
  }
  return n;
}

// Keep rule of active model a from its tallies: the k-th largest is hi, inside (lo, hi), or lo; false if the
// bracket missed it.
template <typename in_t, typename acc_t>
bool keep_from_tally(const in_t* base, const in_t* x, int64_t n, const std::vector<int64_t>& starts,
                     const std::vector<Tally<typename MagBits<acc_t>::S>>& tally, int64_t na, int64_t a,
                     typename MagBits<acc_t>::S lo, typename MagBits<acc_t>::S hi, int64_t k, MagKeep<acc_t>* keep) {
  using S = typename MagBits<acc_t>::S;
  const int64_t nc = static_cast<int64_t>(starts.size());
  const auto at = [&](int64_t c) -> const Tally<S>& { return tally[c * na + a]; };
  int64_t above = 0, eq_hi = 0, eq_lo = 0, inside = 0;
  for (int64_t c = 0; c < nc; ++c) {
    above += at(c).above;
    eq_hi += at(c).eq_hi;
    eq_lo += at(c).eq_lo;
    inside += static_cast<int64_t>(at(c).inside.size());
  }
  if (k <= above) return false;
  if (k <= above + eq_hi) {
    const auto cut = nth_equal_in_chunks<in_t, acc_t>(base, x, n, starts, hi, k - above,
                                                      [&](int64_t c) { return at(c).eq_hi; });
    *keep = {hi, cut};
    return true;
  }
  if (k <= above + eq_hi + inside) {
    std::vector<S> bits;
    bits.reserve(inside);
    for (int64_t c = 0; c < nc; ++c)
      for (const auto& cd : at(c).inside) bits.push_back(cd.bits);
    const int64_t r = k - above - eq_hi - 1;  // 0-based rank of the k-th largest among the candidates (descending)
    std::nth_element(bits.begin(), bits.begin() + r, bits.end(), std::greater<S>());
    const S thr = bits[r];
    int64_t need = k - above - eq_hi;
    for (const S v : bits) need -= v > thr;
    for (int64_t c = 0; c < nc; ++c) {
      for (const auto& cd : at(c).inside) {
        if (cd.bits == thr && --need == 0) {
          *keep = {thr, starts[c] + static_cast<int64_t>(cd.offset) + 1};
          return true;
        }
      }
    }
    return false;  // unreachable: the k-th largest is a candidate
  }
  if (k <= above + eq_hi + inside + eq_lo) {
    const auto cut = nth_equal_in_chunks<in_t, acc_t>(base, x, n, starts, lo, k - above - eq_hi - inside,
                                                      [&](int64_t c) { return at(c).eq_lo; });
    *keep = {lo, cut};
    return true;
  }
  return false;
}

}  // namespace

template <typename in_t, typename acc_t>
std::vector<MagKeep<acc_t>> magnitude_keep(const in_t* base, const std::vector<const in_t*>& xs, int64_t n,
                                           const std::vector<double>& densities, bool sampled) {
  using S = typename MagBits<acc_t>::S;
  constexpr S kMax = std::numeric_limits<S>::max();
  std::vector<MagKeep<acc_t>> keep(xs.size(), MagKeep<acc_t>{0, std::numeric_limits<int64_t>::max()});
  std::vector<int64_t> active, ks;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t k = magnitude_k(densities[i], n);
    if (k == 0) keep[i] = {kMax, 0};
    if (k == 0 || k >= n) continue;
    active.push_back(static_cast<int64_t>(i));
    ks.push_back(k);
  }
  const int64_t na = static_cast<int64_t>(active.size());
  if (!sampled) {
    for (int64_t a = 0; a < na; ++a) keep[active[a]] = radix_keep<in_t, acc_t>(base, xs[active[a]], n, ks[a]);
    return keep;
  }
  if (na == 0) return keep;
  // No bracket (every magnitude a candidate) for small tensors: lo = -1 is below every magnitude.
  std::vector<const in_t*> xa;
  std::vector<S> lo(na, -1), hi(na, kMax);
  for (int64_t a = 0; a < na; ++a) {
    xa.push_back(xs[active[a]]);
    if (n > kAllCandidates) std::tie(lo[a], hi[a]) = sample_bracket<in_t, acc_t>(base, xa[a], n, ks[a]);
  }
  const int64_t nc = std::max<int64_t>(1, std::min(n_blocks(n), kChunks));
  std::vector<int64_t> starts(nc);
  for (int64_t c = 0; c < nc; ++c) starts[c] = n * c / nc;
  std::vector<Tally<S>> tally(nc * na);
  tally_bracket<in_t, acc_t>(base, xa, n, lo, hi, starts, &tally);
  for (int64_t a = 0; a < na; ++a) {
    if (!keep_from_tally<in_t, acc_t>(base, xa[a], n, starts, tally, na, a, lo[a], hi[a], ks[a], &keep[active[a]]))
      keep[active[a]] = radix_keep<in_t, acc_t>(base, xa[a], n, ks[a]);
  }
  return keep;
}

#define NOVA_INSTANTIATE_MAGNITUDE_KEEP(T)                                                                     \
  template std::vector<MagKeep<at::opmath_type<T>>> magnitude_keep<T, at::opmath_type<T>>(                   \
      const T*, const std::vector<const T*>&, int64_t, const std::vector<double>&, bool);
NOVA_INSTANTIATE_MAGNITUDE_KEEP(float)
NOVA_INSTANTIATE_MAGNITUDE_KEEP(double)
NOVA_INSTANTIATE_MAGNITUDE_KEEP(at::Half)
NOVA_INSTANTIATE_MAGNITUDE_KEEP(at::BFloat16)
#undef NOVA_INSTANTIATE_MAGNITUDE_KEEP

}  // namespace cpu
}  // namespace nova_rt
