// The few-token path of modes::masked_experts on CPU, in C++ (modes_fx/kernels/cpp_decode.py
// builds it with torch.utils.cpp_extension on first use). The steps of the Python path
// modes_fx.kernels.fast._decode, in the same order: the kept pairs are grouped by expert on the
// host (experts in increasing id, pairs in token order), an expert with one pair reads its token
// row as a view and accumulates with one add_(y, alpha=weight), an expert with several pairs reads
// its weights once for all its rows and accumulates with index_add_. SiLU-gated experts only;
// plain (not tensor-subclass) weights only: the Python path serves every other case.
//
// fp32 weights go through few_rows_linear below instead of at::linear: at one to four rows a
// product is a weight stream, and this loop streams about 2.4x faster than torch's fp32 mat-vec
// on the machines of docs/benchmarks.md ("The experts' mat-vec"). Its sums associate differently
// from at::linear's (results agree to fp32 rounding, not bit for bit); other dtypes use at::linear
// and match the Python path exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // independent partial sums per dot product: one AVX-512 register

// y[r, o] = dot(x[r, :], w[o, :]) for rows o in [first, last) of w; x [rows, n] with row stride
// x_stride, w [*, n] contiguous, y [rows, m] contiguous. Each weight row is read once from memory
// for all the x rows (it stays in L1 between them). Compiled for AVX-512, AVX2 and a baseline,
// the loader picks the best this CPU has (GCC function multi-versioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void dot_rows(const float* x, int64_t rows, int64_t x_stride, const float* w, int64_t n, int64_t first,
              int64_t last, float* y, int64_t m) {
  for (int64_t o = first; o < last; ++o) {
    const float* w_row = w + o * n;
    for (int64_t r = 0; r < rows; ++r) {
      const float* x_row = x + r * x_stride;
      float partial[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
        for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += w_row[i + lane] * x_row[i + lane];
      }
      float sum = 0.0f;
      for (int64_t lane = 0; lane < kLanes; ++lane) sum += partial[lane];
      for (; i < n; ++i) sum += w_row[i] * x_row[i];
      y[r * m + o] = sum;
    }
  }
}

// at::linear(x, w) for x [rows, n] (unit stride along n) and w [m, n]: dot_rows for fp32
// with contiguous weights, split over the intra-op threads by blocks of weight rows (at least
// 64 KiB of weights each); at::linear otherwise.
at::Tensor few_rows_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "few_rows_linear: x [rows, n] and w [m, n] expected, got ", x.sizes(), " and ", w.sizes());
  if (x.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat || !w.is_contiguous() || x.stride(1) != 1) {
    return at::linear(x, w);
  }
  const int64_t rows = x.size(0), n = w.size(1), m = w.size(0);
  at::Tensor y = at::empty({rows, m}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = w.data_ptr<float>();
  float* y_ptr = y.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (4 * std::max<int64_t>(n, 1)));
  at::parallel_for(0, m, grain, [&](int64_t first, int64_t last) {
    dot_rows(x_ptr, rows, x_stride, w_ptr, n, first, last, y_ptr, m);
  });
  return y;
}

// out [T, H] zeros (the op's output dtype); x [T, H] in the weights' dtype; top_k_index int64
// [T, k]; top_k_weights float [T, k]; keep bool [T, k]; gate_up_proj [E, 2I, H]; down_proj
// [E, H, I]. Returns out with the kept pairs' weighted expert outputs added.
at::Tensor masked_experts_decode(at::Tensor out, const at::Tensor& x, const at::Tensor& top_k_index,
                                 const at::Tensor& top_k_weights, const at::Tensor& keep,
                                 const at::Tensor& gate_up_proj, const at::Tensor& down_proj) {
  const int64_t tokens = top_k_index.size(0), k = top_k_index.size(1);
  const int64_t intermediate = down_proj.size(2);
  const at::Tensor index = top_k_index.contiguous();
  const at::Tensor kept = keep.contiguous();
  const at::Tensor weights = top_k_weights.to(at::kDouble).contiguous();  // as Python's tolist()
  const int64_t* index_ptr = index.data_ptr<int64_t>();
  const bool* kept_ptr = kept.data_ptr<bool>();
  const double* weight_ptr = weights.data_ptr<double>();

  std::map<int64_t, std::vector<std::pair<int64_t, double>>> groups;  // expert -> (token, weight)
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      if (kept_ptr[t * k + s]) groups[index_ptr[t * k + s]].emplace_back(t, weight_ptr[t * k + s]);
    }
  }
  for (const auto& [expert, pairs] : groups) {
    const at::Tensor gate_up = gate_up_proj.select(0, expert);
    const at::Tensor down = down_proj.select(0, expert);
    at::Tensor rows;
    at::Tensor token_ids;
    if (pairs.size() == 1) {
      rows = x.narrow(0, pairs[0].first, 1);
    } else {
      std::vector<int64_t> ids;
      for (const auto& pair : pairs) ids.push_back(pair.first);
      token_ids = at::tensor(ids, at::TensorOptions().dtype(at::kLong).device(out.device()));
      rows = x.index_select(0, token_ids);
    }
    at::Tensor h = few_rows_linear(rows, gate_up);
    at::Tensor act = h.narrow(1, 0, intermediate);
    at::silu_(act);
    act.mul_(h.narrow(1, intermediate, intermediate));
    at::Tensor y = few_rows_linear(act, down);
    if (pairs.size() == 1) {
      out.narrow(0, pairs[0].first, 1).add_(y.to(out.scalar_type()), pairs[0].second);
    } else {
      std::vector<double> pair_weights;
      for (const auto& pair : pairs) pair_weights.push_back(pair.second);
      at::Tensor scale = at::tensor(pair_weights, at::TensorOptions().dtype(at::kDouble)).to(x.scalar_type());
      out.index_add_(0, token_ids, y.mul_(scale.unsqueeze(1)).to(out.scalar_type()));
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(modes_cpu, m) {
  m.def("masked_experts_decode(Tensor(a!) out, Tensor x, Tensor top_k_index, Tensor top_k_weights, "
        "Tensor keep, Tensor gate_up_proj, Tensor down_proj) -> Tensor(a!)");
  m.impl("masked_experts_decode", c10::DispatchKey::CPU, &masked_experts_decode);
  m.def("few_rows_linear(Tensor x, Tensor w) -> Tensor");  // what the op multiplies with (tested alone)
  m.impl("few_rows_linear", c10::DispatchKey::CPU, &few_rows_linear);
}
