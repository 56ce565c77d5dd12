// The few-token path of modes::masked_experts on CPU, in C++ (modes_fx/kernels/cpp_decode.py
// builds it with torch.utils.cpp_extension on first use). Same arithmetic, in the same order, as
// the Python path modes_fx.kernels.fast._decode: the kept pairs are grouped by expert on the host
// (experts in increasing id, pairs in token order), an expert with one pair reads its token row
// as a view and accumulates with one add_(y, alpha=weight), an expert with several pairs reads
// its weights once for all its rows and accumulates with index_add_. SiLU-gated experts only;
// plain (not tensor-subclass) weights only: the Python path serves every other case.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

namespace {

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
    at::Tensor h = at::linear(rows, gate_up);
    at::Tensor act = h.narrow(1, 0, intermediate);
    at::silu_(act);
    act.mul_(h.narrow(1, intermediate, intermediate));
    at::Tensor y = at::linear(act, down);
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
}
