// Passes of the row-blocked TIES threshold (see merge.h): the exact k-th largest magnitude |x_i - base| of a tensor
// too large to map at once, found by a 16-bit-digit radix select whose histograms are summed over its blocks
// (nova_rt/merge/blocked.py drives it: 2 passes for fp16/bf16/fp32 inputs, 4 for fp64), then the tie cutoff from
// per-block counts of the elements equal to the threshold. Integer counts: exact for any block split and thread count.
#include "merge_cpu.h"

#include <ATen/OpMathType.h>
#include <omp.h>

#include <algorithm>
#include <vector>

namespace nova_rt {
namespace {

using cpu::kParallelMin;
constexpr int64_t kBins = 1 << 16;

template <typename in_t, typename acc_t>
inline typename cpu::MagBits<acc_t>::S mag_at(const in_t* x, const in_t* base, int64_t e) {
  return cpu::mag_bits<acc_t>(static_cast<acc_t>(x[e]) - static_cast<acc_t>(base[e]));
}

// Adds the digit histogram of one model into total[0..kBins).
template <typename in_t, typename acc_t>
void histogram_one(const in_t* base, const in_t* x, int64_t n, int shift, bool all, int64_t prefix, int64_t* total) {
  using S = typename cpu::MagBits<acc_t>::S;
  const S want = static_cast<S>(all ? 0 : prefix);
  const int hi_shift = all ? 0 : shift + 16;  // magnitude bits are >= 0: the shifts are exact
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<int64_t> local(kBins, 0);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      const S u = mag_at<in_t, acc_t>(x, base, e);
      if (all || (u >> hi_shift) == want) ++local[(u >> shift) & (kBins - 1)];
    }
#pragma omp critical
    for (int64_t b = 0; b < kBins; ++b) total[b] += local[b];
  }
}

template <typename in_t, typename acc_t>
int64_t count_equal(const in_t* base, const in_t* x, int64_t n, int64_t thr) {
  using S = typename cpu::MagBits<acc_t>::S;
  const S bits = static_cast<S>(thr);
  int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count) if (n > kParallelMin)
  for (int64_t e = 0; e < n; ++e) count += mag_at<in_t, acc_t>(x, base, e) == bits;
  return count;
}

template <typename in_t, typename acc_t>
int64_t nth_equal(const in_t* base, const in_t* x, int64_t n, int64_t thr, int64_t need) {
  using S = typename cpu::MagBits<acc_t>::S;
  const S bits = static_cast<S>(thr);
  for (int64_t e = 0; e < n; ++e)
    if (mag_at<in_t, acc_t>(x, base, e) == bits && --need == 0) return e + 1;
  return n;
}

}  // namespace

void magnitude_histogram_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t shift,
                             const std::vector<int64_t>& prefix, torch::Tensor& hist) {
  const int64_t n = base.numel();
  int64_t* total = hist.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "magnitude_histogram_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t kBits = 8 * sizeof(typename cpu::MagBits<acc_t>::S);
    for (size_t i = 0; i < xs.size(); ++i) {
      const bool all = prefix[i] < 0 || shift + 16 >= kBits;
      histogram_one<scalar_t, acc_t>(base.data_ptr<scalar_t>(), xs[i].data_ptr<scalar_t>(), n,
                                     static_cast<int>(shift), all, prefix[i], total + i * kBins);
    }
  });
}

std::vector<int64_t> magnitude_equal_counts_cpu(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                                const std::vector<int64_t>& thr) {
  std::vector<int64_t> counts(xs.size(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "magnitude_equal_counts_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (size_t i = 0; i < xs.size(); ++i)
      counts[i] = count_equal<scalar_t, acc_t>(base.data_ptr<scalar_t>(), xs[i].data_ptr<scalar_t>(), base.numel(),
                                               thr[i]);
  });
  return counts;
}

int64_t magnitude_nth_equal_cpu(const torch::Tensor& base, const torch::Tensor& x, int64_t thr, int64_t need) {
  int64_t found = base.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "magnitude_nth_equal_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    found = nth_equal<scalar_t, acc_t>(base.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), base.numel(), thr, need);
  });
  return found;
}

}  // namespace nova_rt
