// CUDA implementation of the merge ops (math in merge.h). Element-wise ops are grid-stride kernels that read each
// input once and write the output once in its final dtype (fp32 math in registers), so an N-model merge moves
// (N + 1) * in_bytes + out_bytes per element: the floor for a memory-bound op. Reductions (SLERP norms, Model Stock
// Gram matrices) accumulate fp32 per thread, reduce per warp and add per-warp partials into fp64 with atomics.
// TIES thresholds use ATen's kthvalue (radix select) on |x - base| computed with the same fp32 arithmetic as the
// element kernel, so keep decisions agree bit-for-bit with the CPU path. Up to kMaxModels models per launch
// (pointers travel in the kernel parameters).
#include "merge.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <limits>

namespace nova_rt {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Inputs {
  const T* p[kMaxModels];
};

struct Coefs {
  double w[kMaxModels];
  double thr[kMaxModels];
  int64_t cutoff[kMaxModels];
  double density[kMaxModels];
  float scale[kMaxModels];
  uint64_t stream[kMaxModels];
};

#define NOVA_CUDA_DISPATCH_IN_OUT(IN_TYPE, OUT_TYPE, NAME, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, IN_TYPE, NAME, [&] {                              \
    using in_t = scalar_t;                                                                                     \
    using acc_t = at::opmath_type<in_t>;                                                                       \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, OUT_TYPE, NAME, [&] {                           \
      using out_t = scalar_t;                                                                                  \
      __VA_ARGS__();                                                                                           \
    });                                                                                                        \
  })

int grid_for(int64_t n) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, static_cast<int64_t>(sms) * 16)));
}

template <typename T>
Inputs<T> input_ptrs(const std::vector<torch::Tensor>& xs) {
  Inputs<T> in{};
  for (size_t i = 0; i < xs.size(); ++i) in.p[i] = xs[i].data_ptr<T>();
  return in;
}

template <typename in_t, typename acc_t, typename out_t>
__global__ void weighted_sum_kernel(Inputs<in_t> xs, Coefs c, int n_models, acc_t scale, out_t* out, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t acc = acc_t(0);
    for (int i = 0; i < n_models; ++i) acc += static_cast<acc_t>(c.w[i]) * static_cast<acc_t>(xs.p[i][e]);
    out[e] = static_cast<out_t>(acc * scale);
  }
}

// w_i * sparsify_i(x_i - base) for one element (0 when dropped).
template <typename acc_t, int SPARSIFY>
__device__ __forceinline__ acc_t sparse_delta(const Coefs& c, int i, acc_t d, acc_t w, int64_t e) {
  bool keep = true;
  if (SPARSIFY == 1) {
    const double ad = fabs(static_cast<double>(d));
    keep = ad > c.thr[i] || (ad == c.thr[i] && e < c.cutoff[i]);
  } else if (SPARSIFY == 2) {
    keep = dare_keep(c.stream[i], e, c.density[i]);
  }
  return keep ? w * (d * static_cast<acc_t>(c.scale[i])) : acc_t(0);
}

template <typename in_t, typename acc_t, typename out_t, int SPARSIFY, bool CONSENSUS>
__global__ void gta_kernel(const in_t* base, Inputs<in_t> xs, Coefs c, int n_models, bool normalize, acc_t lambda,
                           acc_t linear_div, out_t* out, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t b = static_cast<acc_t>(base[e]);
    acc_t sum = acc_t(0);
    for (int i = 0; i < n_models; ++i)
      sum += sparse_delta<acc_t, SPARSIFY>(c, i, static_cast<acc_t>(xs.p[i][e]) - b, static_cast<acc_t>(c.w[i]), e);
    acc_t div = linear_div;
    if (CONSENSUS) {
      const bool pos = sum >= acc_t(0);
      acc_t mix = acc_t(0), dv = acc_t(0);
      for (int i = 0; i < n_models; ++i) {  // recompute instead of spilling N values: inputs are L1/L2 hits now
        const acc_t w = static_cast<acc_t>(c.w[i]);
        const acc_t v = sparse_delta<acc_t, SPARSIFY>(c, i, static_cast<acc_t>(xs.p[i][e]) - b, w, e);
        const bool agree = pos ? v > acc_t(0) : v < acc_t(0);
        mix += agree ? v : acc_t(0);
        dv += agree ? w : acc_t(0);
      }
      sum = mix;
      div = (!normalize || dv == acc_t(0)) ? acc_t(1) : dv;
    }
    out[e] = static_cast<out_t>(b + sum / div * lambda);
  }
}

// Sum a float over the block's warps into *dst (fp64 atomics, one per warp).
__device__ __forceinline__ void warp_atomic_add(double* dst, float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(dst, static_cast<double>(v));
}

template <typename in_t>
__global__ void slerp_reduce_kernel(const in_t* a, const in_t* b, int64_t n, double* sums) {
  float aa = 0.f, bb = 0.f, ab = 0.f;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = static_cast<float>(a[e]), y = static_cast<float>(b[e]);
    aa += x * x;
    bb += y * y;
    ab += x * y;
  }
  warp_atomic_add(&sums[0], aa);
  warp_atomic_add(&sums[1], bb);
  warp_atomic_add(&sums[2], ab);
}

template <typename in_t, typename acc_t, typename out_t>
__global__ void axpby_kernel(const in_t* a, const in_t* b, acc_t fa, acc_t fb, out_t* out, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[e] = static_cast<out_t>(fa * static_cast<acc_t>(a[e]) + fb * static_cast<acc_t>(b[e]));
}

// Gram matrix of the task vectors per row; block b handles row b / chunks, chunk b % chunks. NM models (2..8).
template <typename in_t, int NM>
__global__ void gram_kernel(const in_t* base, Inputs<in_t> xs, int64_t cols, int64_t chunks, double* gram) {
  const int64_t r = blockIdx.x / chunks, chunk = blockIdx.x % chunks, s = r * cols;
  float acc[NM * NM];
#pragma unroll
  for (int p = 0; p < NM * NM; ++p) acc[p] = 0.f;
  for (int64_t e = chunk * blockDim.x + threadIdx.x; e < cols; e += chunks * blockDim.x) {
    const float b = static_cast<float>(base[s + e]);
    float d[NM];
#pragma unroll
    for (int i = 0; i < NM; ++i) d[i] = static_cast<float>(xs.p[i][s + e]) - b;
#pragma unroll
    for (int i = 0; i < NM; ++i)
#pragma unroll
      for (int j = i; j < NM; ++j) acc[i * NM + j] += d[i] * d[j];
  }
#pragma unroll
  for (int i = 0; i < NM; ++i)
#pragma unroll
    for (int j = i; j < NM; ++j) warp_atomic_add(&gram[r * NM * NM + i * NM + j], acc[i * NM + j]);
}

// t of each row from its Gram matrix (same formula as model_stock_t in merge_cpu.cpp).
__global__ void stock_t_kernel(const double* gram, int n_models, int64_t rows, float* t_out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  const double* g = gram + r * n_models * n_models;
  double cos_sum = 0.0;
  int pairs = 0;
  for (int i = 0; i < n_models; ++i)
    for (int j = i + 1; j < n_models; ++j, ++pairs) {
      const double norm = sqrt(g[i * n_models + i]) * sqrt(g[j * n_models + j]);
      cos_sum += fmin(1.0, fmax(-1.0, g[i * n_models + j] / fmax(norm, 1e-6)));
    }
  const double cs = cos_sum / pairs, den = 1.0 + (n_models - 1) * cs;
  t_out[r] = fabs(den) < 1e-6 ? 0.f : static_cast<float>(n_models * cs / den);
}

template <typename in_t, typename acc_t, typename out_t>
__global__ void stock_apply_kernel(const in_t* base, Inputs<in_t> xs, int n_models, const float* t, int64_t cols,
                                   out_t* out, int64_t n) {
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n_models);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t tr = static_cast<acc_t>(t[e / cols]);
    acc_t acc = acc_t(0);
    for (int i = 0; i < n_models; ++i) acc += static_cast<acc_t>(xs.p[i][e]);
    out[e] = static_cast<out_t>(tr * (acc * inv_n) + (acc_t(1) - tr) * static_cast<acc_t>(base[e]));
  }
}

// Per-model (thr, cutoff) of the magnitude sparsifier: kthvalue for the threshold, then the index of the
// need-th element equal to it (need = k - #greater). With thr == 0 the tie order cannot change the result.
void magnitude_coefs_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs,
                          const std::vector<double>& densities, Coefs& c) {
  const int64_t n = base.numel();
  const auto acc_type = base.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto b = base.reshape(-1).to(acc_type);
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t k = magnitude_k(densities[i], n);
    c.thr[i] = -1.0;
    c.cutoff[i] = 0;
    if (k >= n) continue;
    if (k == 0) {
      c.thr[i] = std::numeric_limits<double>::infinity();
      continue;
    }
    const auto ad = (xs[i].reshape(-1).to(acc_type) - b).abs();
    const auto thr_t = std::get<0>(at::kthvalue(ad, n - k + 1));
    const double thr = thr_t.item<double>();
    const int64_t need = k - (ad > thr_t).sum().item<int64_t>();
    c.thr[i] = thr;
    c.cutoff[i] = n;
    if (thr > 0.0) c.cutoff[i] = at::nonzero(ad == thr_t).reshape(-1)[need - 1].item<int64_t>() + 1;
  }
}

template <typename in_t, typename acc_t, typename out_t, int SPARSIFY>
void launch_gta(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const Coefs& c, const GtaArgs& args,
                torch::Tensor& out) {
  const int64_t n = base.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto lambda = static_cast<acc_t>(args.lambda);
  const auto linear_div = static_cast<acc_t>(gta_linear_divisor(args));
  const int nm = static_cast<int>(xs.size());
  if (args.consensus) {
    gta_kernel<in_t, acc_t, out_t, SPARSIFY, true><<<grid_for(n), kThreads, 0, stream>>>(
        base.data_ptr<in_t>(), input_ptrs<in_t>(xs), c, nm, args.normalize, lambda, linear_div,
        out.data_ptr<out_t>(), n);
  } else {
    gta_kernel<in_t, acc_t, out_t, SPARSIFY, false><<<grid_for(n), kThreads, 0, stream>>>(
        base.data_ptr<in_t>(), input_ptrs<in_t>(xs), c, nm, args.normalize, lambda, linear_div,
        out.data_ptr<out_t>(), n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gram matrices [rows, n, n] (upper triangle) of the task vectors: fused kernel for 2..8 models, ATen beyond.
template <typename in_t>
torch::Tensor task_gram_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t rows,
                             int64_t cols) {
  const int nm = static_cast<int>(xs.size());
  auto gram = torch::zeros({rows, nm, nm}, base.options().dtype(at::kDouble));
  if (rows == 0) return gram;
  if (nm > 8) {
    std::vector<torch::Tensor> ds;
    for (const auto& x : xs) ds.push_back((x.to(at::kFloat) - base.to(at::kFloat)).reshape({rows, cols}));
    const auto d = torch::stack(ds, 1);  // [rows, n, cols]
    return at::bmm(d, d.transpose(1, 2)).to(at::kDouble);
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((cols + kThreads - 1) / kThreads,
                                                                std::max<int64_t>(1, 4096 / rows)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto in = input_ptrs<in_t>(xs);
  const dim3 grid(static_cast<unsigned>(rows * chunks));
  double* g = gram.data_ptr<double>();
  switch (nm) {
#define NOVA_GRAM_CASE(NM) \
  case NM: gram_kernel<in_t, NM><<<grid, kThreads, 0, stream>>>(base.data_ptr<in_t>(), in, cols, chunks, g); break;
    NOVA_GRAM_CASE(2) NOVA_GRAM_CASE(3) NOVA_GRAM_CASE(4) NOVA_GRAM_CASE(5) NOVA_GRAM_CASE(6) NOVA_GRAM_CASE(7)
    NOVA_GRAM_CASE(8)
#undef NOVA_GRAM_CASE
    default: TORCH_CHECK(false, "model_stock: unexpected model count ", nm);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return gram;
}

}  // namespace

torch::Tensor weighted_sum_cuda(const std::vector<torch::Tensor>& xs, const std::vector<double>& weights, double scale,
                                at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(xs[0].device());
  auto out = torch::empty(xs[0].sizes(), xs[0].options().dtype(out_dtype));
  const int64_t n = xs[0].numel();
  if (n == 0) return out;
  Coefs c{};
  for (size_t i = 0; i < weights.size(); ++i) c.w[i] = weights[i];
  NOVA_CUDA_DISPATCH_IN_OUT(xs[0].scalar_type(), out_dtype, "weighted_sum_cuda", [&] {
    weighted_sum_kernel<in_t, acc_t, out_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input_ptrs<in_t>(xs), c, static_cast<int>(xs.size()), static_cast<acc_t>(scale), out.data_ptr<out_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

torch::Tensor gta_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, const GtaArgs& args,
                       at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(base.device());
  auto out = torch::empty(base.sizes(), base.options().dtype(out_dtype));
  if (base.numel() == 0) return out;
  Coefs c{};
  for (size_t i = 0; i < xs.size(); ++i) {
    c.w[i] = args.weights[i];
    c.thr[i] = -1.0;
    c.density[i] = args.densities[i];
    c.scale[i] = 1.0f;
  }
  if (args.sparsify == Sparsify::kMagnitude) magnitude_coefs_cuda(base, xs, args.densities, c);
  if (args.sparsify == Sparsify::kRandom) {
    const auto sp = random_params(args, static_cast<int64_t>(xs.size()));
    for (size_t i = 0; i < xs.size(); ++i) {
      c.scale[i] = sp[i].scale;
      c.stream[i] = sp[i].stream;
    }
  }
  NOVA_CUDA_DISPATCH_IN_OUT(base.scalar_type(), out_dtype, "gta_cuda", [&] {
    switch (args.sparsify) {
      case Sparsify::kMagnitude: launch_gta<in_t, acc_t, out_t, 1>(base, xs, c, args, out); break;
      case Sparsify::kRandom: launch_gta<in_t, acc_t, out_t, 2>(base, xs, c, args, out); break;
      default: launch_gta<in_t, acc_t, out_t, 0>(base, xs, c, args, out); break;
    }
  });
  return out;
}

torch::Tensor slerp_cuda(const torch::Tensor& a, const torch::Tensor& b, double t, double dot_threshold, double eps,
                         at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = torch::empty(a.sizes(), a.options().dtype(out_dtype));
  const int64_t n = a.numel();
  auto sums = torch::zeros({3}, a.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  NOVA_CUDA_DISPATCH_IN_OUT(a.scalar_type(), out_dtype, "slerp_cuda", [&] {
    if (n > 0) {
      slerp_reduce_kernel<in_t><<<grid_for(n), kThreads, 0, stream>>>(a.data_ptr<in_t>(), b.data_ptr<in_t>(), n,
                                                                      sums.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const auto h = sums.cpu();
    const double* s = h.data_ptr<double>();
    double ca = 1.0 - t, cb = t;
    slerp_coefficients(s[0], s[1], s[2], t, dot_threshold, eps, &ca, &cb);
    if (n > 0) {
      axpby_kernel<in_t, acc_t, out_t><<<grid_for(n), kThreads, 0, stream>>>(
          a.data_ptr<in_t>(), b.data_ptr<in_t>(), static_cast<acc_t>(ca), static_cast<acc_t>(cb),
          out.data_ptr<out_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

torch::Tensor model_stock_cuda(const torch::Tensor& base, const std::vector<torch::Tensor>& xs, int64_t row_len,
                               at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = base.numel();
  auto out = torch::empty(base.sizes(), base.options().dtype(out_dtype));
  if (n == 0) return out;
  const int64_t cols = row_len > 0 ? row_len : n, rows = n / cols;
  const int nm = static_cast<int>(xs.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto t = torch::empty({rows}, base.options().dtype(at::kFloat));
  NOVA_CUDA_DISPATCH_IN_OUT(base.scalar_type(), out_dtype, "model_stock_cuda", [&] {
    const auto gram = task_gram_cuda<in_t>(base, xs, rows, cols).contiguous();
    stock_t_kernel<<<static_cast<unsigned>((rows + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        gram.data_ptr<double>(), nm, rows, t.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stock_apply_kernel<in_t, acc_t, out_t><<<grid_for(n), kThreads, 0, stream>>>(
        base.data_ptr<in_t>(), input_ptrs<in_t>(xs), nm, t.data_ptr<float>(), cols, out.data_ptr<out_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace nova_rt
