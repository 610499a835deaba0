// The only module block of nova_rt._C: input checks (TORCH_CHECK) and CPU/CUDA routing for the merge ops.
// Python callers go through nova_rt/merge/ops.py, which picks this extension or the PyTorch reference.
#include "merge.h"

#include <omp.h>

namespace nova_rt {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// All inputs: same shape, dtype and device as the first; contiguous; floating point.
void check_inputs(const char* op, const std::vector<torch::Tensor>& xs, at::ScalarType out_dtype) {
  TORCH_CHECK(!xs.empty(), op, ": needs at least one input tensor");
  const auto& x0 = xs[0];
  TORCH_CHECK(is_float_dtype(x0.scalar_type()), op, ": inputs must be fp32/fp16/bf16/fp64, got ", x0.scalar_type());
  TORCH_CHECK(is_float_dtype(out_dtype), op, ": out_dtype must be fp32/fp16/bf16/fp64, got ", out_dtype);
  TORCH_CHECK(x0.is_cpu() || x0.is_cuda(), op, ": tensors must be on CPU or CUDA, got ", x0.device());
  for (size_t i = 0; i < xs.size(); ++i) {
    const auto& x = xs[i];
    TORCH_CHECK(x.sizes() == x0.sizes(), op, ": input ", i, " has shape ", x.sizes(), ", input 0 has ", x0.sizes());
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), op, ": input ", i, " is ", x.scalar_type(), ", input 0 is ",
                x0.scalar_type());
    TORCH_CHECK(x.device() == x0.device(), op, ": input ", i, " is on ", x.device(), ", input 0 on ", x0.device());
    TORCH_CHECK(x.is_contiguous(), op, ": input ", i, " must be contiguous");
  }
  if (x0.is_cuda()) {
#ifdef NOVA_RT_WITH_CUDA
    TORCH_CHECK(static_cast<int>(xs.size()) <= kMaxModels + 1, op, ": at most ", kMaxModels, " models per call on CUDA");
#else
    TORCH_CHECK(false, op, ": nova_rt._C was built without CUDA; use the PyTorch reference for CUDA tensors");
#endif
  }
}

// `out` must match the inputs: shape, device, out_dtype, contiguous.
void check_out(const char* op, const torch::Tensor& like, at::ScalarType out_dtype, const torch::Tensor& o) {
  TORCH_CHECK(o.sizes() == like.sizes(), op, ": out has shape ", o.sizes(), ", inputs have ", like.sizes());
  TORCH_CHECK(o.scalar_type() == out_dtype, op, ": out is ", o.scalar_type(), " but out_dtype is ", out_dtype);
  TORCH_CHECK(o.device() == like.device(), op, ": out is on ", o.device(), ", inputs on ", like.device());
  TORCH_CHECK(o.is_contiguous(), op, ": out must be contiguous");
}

// The output: `out` when given (checked against the inputs), else a fresh tensor of out_dtype.
torch::Tensor output_for(const char* op, const torch::Tensor& like, at::ScalarType out_dtype,
                         const c10::optional<torch::Tensor>& out) {
  if (!out.has_value()) return torch::empty(like.sizes(), like.options().dtype(out_dtype));
  check_out(op, like, out_dtype, *out);
  return *out;
}

#ifdef NOVA_RT_WITH_CUDA
// The CUDA ops allocate their result (from the caching allocator); copy it into `out` when one was given.
torch::Tensor into(const char* op, torch::Tensor result, const c10::optional<torch::Tensor>& out) {
  if (!out.has_value()) return result;
  check_out(op, result, result.scalar_type(), *out);
  out->copy_(result);
  return *out;
}
#endif

std::vector<torch::Tensor> with_base(const torch::Tensor& base, const std::vector<torch::Tensor>& xs) {
  std::vector<torch::Tensor> all{base};
  all.insert(all.end(), xs.begin(), xs.end());
  return all;
}

torch::Tensor weighted_sum(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                           at::ScalarType out_dtype, const c10::optional<torch::Tensor>& out) {
  check_inputs("weighted_sum", xs, out_dtype);
  TORCH_CHECK(weights.size() == xs.size(), "weighted_sum: ", xs.size(), " tensors but ", weights.size(), " weights");
#ifdef NOVA_RT_WITH_CUDA
  if (xs[0].is_cuda()) return into("weighted_sum", weighted_sum_cuda(xs, weights, scale, out_dtype), out);
#endif
  auto result = output_for("weighted_sum", xs[0], out_dtype, out);
  weighted_sum_cpu(xs, weights, scale, result);
  return result;
}

torch::Tensor gta(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const std::vector<double>& weights,
                  const std::vector<double>& densities, int64_t sparsify, bool consensus, bool normalize,
                  double lambda, bool rescale, int64_t seed, int64_t tensor_id, at::ScalarType out_dtype,
                  const c10::optional<torch::Tensor>& out, int64_t offset, const std::vector<int64_t>& mag_thr,
                  const std::vector<int64_t>& mag_cutoff) {
  check_inputs("gta", with_base(base, xs), out_dtype);
  TORCH_CHECK(!xs.empty(), "gta: needs at least one model besides the base");
  TORCH_CHECK(weights.size() == xs.size(), "gta: ", xs.size(), " models but ", weights.size(), " weights");
  TORCH_CHECK(densities.size() == xs.size(), "gta: ", xs.size(), " models but ", densities.size(), " densities");
  TORCH_CHECK(sparsify >= 0 && sparsify <= 2, "gta: sparsify must be 0 (none), 1 (magnitude) or 2 (random)");
  TORCH_CHECK(offset >= 0, "gta: offset must be >= 0");
  TORCH_CHECK(mag_thr.size() == mag_cutoff.size() && (mag_thr.empty() || mag_thr.size() == xs.size()),
              "gta: mag_thr and mag_cutoff need one entry per model (or none)");
  TORCH_CHECK(base.is_cpu() || (offset == 0 && mag_thr.empty()), "gta: offset / mag_thr are CPU-only");
  GtaArgs args{weights, densities, static_cast<Sparsify>(sparsify), consensus, normalize, lambda, rescale, seed,
               tensor_id, offset, mag_thr, mag_cutoff};
#ifdef NOVA_RT_WITH_CUDA
  if (base.is_cuda()) return into("gta", gta_cuda(base, xs, args, out_dtype), out);
#endif
  auto result = output_for("gta", base, out_dtype, out);
  gta_cpu(base, xs, args, result);
  return result;
}

// partials: slerp_partials' [chunks, 3] fp64 sums of the whole tensor when a and b are one block of it.
torch::Tensor slerp(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
                    at::ScalarType out_dtype, const c10::optional<torch::Tensor>& out,
                    const c10::optional<torch::Tensor>& partials) {
  check_inputs("slerp", {a, b}, out_dtype);
  std::vector<double> sums;
  if (partials.has_value()) {
    const auto& part = *partials;
    TORCH_CHECK(a.is_cpu() && part.is_cpu() && part.scalar_type() == at::kDouble && part.is_contiguous() &&
                    part.dim() == 2 && part.size(1) == 3, "slerp: partials must be a contiguous CPU fp64 [chunks, 3]");
    sums.assign(3, 0.0);
    const double* p = part.data_ptr<double>();
    for (int64_t c = 0; c < part.size(0); ++c)
      for (int64_t j = 0; j < 3; ++j) sums[j] += p[c * 3 + j];  // chunk order, as slerp_cpu's own pass
  }
#ifdef NOVA_RT_WITH_CUDA
  if (a.is_cuda()) return into("slerp", slerp_cuda(a, b, t, dot_threshold, eps, out_dtype), out);
#endif
  auto result = output_for("slerp", a, out_dtype, out);
  slerp_cpu(a, b, t, dot_threshold, eps, result, sums);
  return result;
}

torch::Tensor model_stock(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                          at::ScalarType out_dtype, const c10::optional<torch::Tensor>& out) {
  check_inputs("model_stock", with_base(base, xs), out_dtype);
  TORCH_CHECK(xs.size() >= 2, "model_stock: needs at least 2 models besides the base, got ", xs.size());
  TORCH_CHECK(row_len >= 0, "model_stock: row_len must be >= 0 (0 = whole tensor)");
  TORCH_CHECK(row_len == 0 || base.numel() % row_len == 0, "model_stock: row_len ", row_len, " does not divide ",
              base.numel(), " elements");
#ifdef NOVA_RT_WITH_CUDA
  if (base.is_cuda()) return into("model_stock", model_stock_cuda(base, xs, row_len, out_dtype), out);
#endif
  auto result = output_for("model_stock", base, out_dtype, out);
  model_stock_cpu(base, xs, row_len, result);
  return result;
}

void check_cpu(const char* op, const torch::Tensor& x) {
  TORCH_CHECK(x.is_cpu(), op, ": CPU tensors only (the PyTorch reference runs CUDA tensors)");
}

torch::Tensor nearswap(const torch::Tensor& base, const torch::Tensor& x, double t, at::ScalarType out_dtype,
                       const c10::optional<torch::Tensor>& out) {
  check_inputs("nearswap", {base, x}, out_dtype);
  check_cpu("nearswap", base);
  auto result = output_for("nearswap", base, out_dtype, out);
  nearswap_cpu(base, x, t, result);
  return result;
}

torch::Tensor ram(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps,
                  const std::vector<double>& scales, at::ScalarType out_dtype, const c10::optional<torch::Tensor>& out) {
  check_inputs("ram", with_base(base, xs), out_dtype);
  check_cpu("ram", base);
  TORCH_CHECK(!xs.empty(), "ram: needs at least one model besides the base");
  TORCH_CHECK(scales.empty() || scales.size() == xs.size(), "ram: ", xs.size(), " models but ", scales.size(),
              " scales");
  auto result = output_for("ram", base, out_dtype, out);
  ram_cpu(base, xs, eps, scales, result);
  return result;
}

std::vector<int64_t> ram_counts(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, double eps) {
  check_inputs("ram_counts", with_base(base, xs), base.scalar_type());
  check_cpu("ram_counts", base);
  return ram_counts_cpu(base, xs, eps);
}

// (thresholds, cutoffs) of the magnitude sparsifier by either selection, for tests against a stable-sort reference.
std::pair<std::vector<double>, std::vector<int64_t>> magnitude_params(const torch::Tensor& base,
                                                                      const std::vector<torch::Tensor>& xs,
                                                                      const std::vector<double>& densities,
                                                                      const std::string& method) {
  check_inputs("magnitude_params", with_base(base, xs), base.scalar_type());
  TORCH_CHECK(base.is_cpu(), "magnitude_params: CPU tensors only");
  TORCH_CHECK(densities.size() == xs.size(), "magnitude_params: one density per model");
  TORCH_CHECK(method == "sampled" || method == "radix", "magnitude_params: method must be sampled or radix");
  std::pair<std::vector<double>, std::vector<int64_t>> out;
  for (const auto& p : magnitude_params_cpu(base, xs, densities, method == "sampled")) {
    out.first.push_back(p.thr);
    out.second.push_back(p.cutoff);
  }
  return out;
}

// ---- row-blocked merging (blocked_cpu.cpp; driven by nova_rt/merge/blocked.py) ----

void magnitude_histogram(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t shift,
                         const std::vector<int64_t>& prefix, torch::Tensor hist) {
  check_inputs("magnitude_histogram", with_base(base, xs), base.scalar_type());
  check_cpu("magnitude_histogram", base);
  TORCH_CHECK(prefix.size() == xs.size(), "magnitude_histogram: one prefix per model");
  TORCH_CHECK(shift >= 0 && shift % 16 == 0 && shift < 64, "magnitude_histogram: shift must be 0, 16, 32 or 48");
  TORCH_CHECK(hist.is_cpu() && hist.scalar_type() == at::kLong && hist.is_contiguous() &&
                  hist.numel() == static_cast<int64_t>(xs.size()) * 65536,
              "magnitude_histogram: hist must be a contiguous CPU int64 [models, 65536]");
  magnitude_histogram_cpu(base, xs, shift, prefix, hist);
}

std::vector<int64_t> magnitude_equal_counts(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                                            const std::vector<int64_t>& thr) {
  check_inputs("magnitude_equal_counts", with_base(base, xs), base.scalar_type());
  check_cpu("magnitude_equal_counts", base);
  TORCH_CHECK(thr.size() == xs.size(), "magnitude_equal_counts: one threshold per model");
  return magnitude_equal_counts_cpu(base, xs, thr);
}

int64_t magnitude_nth_equal(const torch::Tensor& base, const torch::Tensor& x, int64_t thr, int64_t need) {
  check_inputs("magnitude_nth_equal", {base, x}, base.scalar_type());
  check_cpu("magnitude_nth_equal", base);
  TORCH_CHECK(need >= 1, "magnitude_nth_equal: need must be >= 1");
  return magnitude_nth_equal_cpu(base, x, thr, need);
}

int64_t slerp_partials(const torch::Tensor& a, const torch::Tensor& b, int64_t offset, int64_t n_total,
                       const c10::optional<torch::Tensor>& part) {
  if (!part.has_value()) return slerp_chunks(n_total);  // the number of chunks, to allocate part
  check_inputs("slerp_partials", {a, b}, a.scalar_type());
  check_cpu("slerp_partials", a);
  TORCH_CHECK(offset >= 0 && offset % 1024 == 0 && offset + a.numel() <= n_total &&
                  (offset + a.numel() == n_total || a.numel() % 1024 == 0),
              "slerp_partials: a block must start at a multiple of 1024 elements and end at one or at the end");
  TORCH_CHECK(part->is_cpu() && part->scalar_type() == at::kDouble && part->is_contiguous() &&
                  part->numel() == slerp_chunks(n_total) * 3, "slerp_partials: part must be CPU fp64 [chunks, 3]");
  auto p = *part;
  slerp_partials_cpu(a, b, offset, n_total, p);
  return slerp_chunks(n_total);
}

int64_t num_threads() { return omp_get_max_threads(); }

bool has_cuda() {
#ifdef NOVA_RT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace nova_rt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "nova_rt weight-space merge ops (CPU OpenMP; CUDA when built with NOVA_RT_WITH_CUDA)";
  // The ops release the GIL so the streaming merge can read the next tensor while this one is computed.
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  // `out` (optional): a preallocated output to write into (e.g. a view of the output file's mapping).
  const auto out = "out"_a = pybind11::none();
  m.def("weighted_sum", &nova_rt::weighted_sum, "scale * sum_i w_i x_i", nogil, "xs"_a, "weights"_a, "scale"_a,
        "out_dtype"_a, out);
  m.def("gta", &nova_rt::gta, "generalized task arithmetic: task arithmetic, TIES, DARE", nogil, "base"_a, "xs"_a,
        "weights"_a, "densities"_a, "sparsify"_a, "consensus"_a, "normalize"_a, "lam"_a, "rescale"_a, "seed"_a,
        "tensor_id"_a, "out_dtype"_a, out, "offset"_a = 0, "mag_thr"_a = std::vector<int64_t>{},
        "mag_cutoff"_a = std::vector<int64_t>{});
  m.def("slerp", &nova_rt::slerp, "spherical interpolation of two tensors", nogil, "a"_a, "b"_a, "t"_a,
        "dot_threshold"_a, "eps"_a, "out_dtype"_a, out, "partials"_a = pybind11::none());
  m.def("model_stock", &nova_rt::model_stock, "Model Stock (row_len 0: whole tensor)", nogil, "base"_a, "xs"_a,
        "row_len"_a, "out_dtype"_a, out);
  m.def("magnitude_params", &nova_rt::magnitude_params, "TIES top-k thresholds and tie cutoffs", nogil, "base"_a,
        "xs"_a, "densities"_a, "method"_a = "sampled");
  m.def("nearswap", &nova_rt::nearswap, "nearswap of one model towards the base (CPU)", nogil, "base"_a, "x"_a,
        "t"_a, "out_dtype"_a, out);
  m.def("ram", &nova_rt::ram, "RAM / RAM+ (scales: RAM+'s per-model unique factors; empty: RAM) (CPU)", nogil,
        "base"_a, "xs"_a, "eps"_a, "scales"_a, "out_dtype"_a, out);
  m.def("ram_counts", &nova_rt::ram_counts, "per model [shared, unique] counted elements, flattened (CPU)", nogil,
        "base"_a, "xs"_a, "eps"_a);
  m.def("magnitude_histogram", &nova_rt::magnitude_histogram, "add 16-bit digit histograms of |x_i - base| (CPU)",
        nogil, "base"_a, "xs"_a, "shift"_a, "prefix"_a, "hist"_a);
  m.def("magnitude_equal_counts", &nova_rt::magnitude_equal_counts, "per model, |x_i - base| bits equal to thr_i",
        nogil, "base"_a, "xs"_a, "thr"_a);
  m.def("magnitude_nth_equal", &nova_rt::magnitude_nth_equal, "1 + index of the need-th |x - base| equal to thr",
        nogil, "base"_a, "x"_a, "thr"_a, "need"_a);
  m.def("slerp_partials", &nova_rt::slerp_partials, "add one block's SLERP chunk sums into part (none: chunk count)",
        nogil, "a"_a, "b"_a, "offset"_a, "n_total"_a, "part"_a = pybind11::none());
  m.def("num_threads", &nova_rt::num_threads, "OpenMP threads the ops use (omp_get_max_threads)");
  m.def("has_cuda", &nova_rt::has_cuda, "whether CUDA kernels were compiled in");
}
