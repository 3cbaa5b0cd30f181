// What meft_ds's two kernel sources share (meft_cpu.cpp, adapter.cpp): checks, vector helpers, the grouping of
// entries by id, and the functions adapter.cpp defines for meft_cpu.cpp's Python module.
#pragma once

// torch/types.h, not torch/extension.h: the Python bindings (pybind11, the whole C++ API: ~3x the compile time)
// are meft_cpu.cpp's alone
#include <torch/types.h>
#include <omp.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace meft {

inline void check_rows(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a CPU float32 tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}


// a . b in 64 independent partial sums (4 AVX-512 or 8 AVX2 registers): one running sum would chain every
// multiply-add on the one before it, latency-bound (score_probed at T = 512, d = 576, 8 x 32 keys per token: 9.98 ->
// 8.24 ms on the Intel Xeon; the forward kernel, bound by reading rows, is unchanged)
inline float dot(const float* a, const float* b, int64_t n) {
    constexpr int64_t lanes = 64;
    float partial[lanes] = {};
    int64_t c = 0;
    for (; c + lanes <= n; c += lanes) {
#pragma omp simd
        for (int64_t i = 0; i < lanes; ++i) partial[i] += a[c + i] * b[c + i];
    }
    for (int64_t i = 0; c + i < n; ++i) partial[i] += a[c + i] * b[c + i];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < lanes; ++i) sum += partial[i];
    return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

inline void check_adapter_inputs(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& union_pos,
                          const torch::Tensor& gate) {
    check_rows(x, "x");
    check_rows(rows, "rows");
    TORCH_CHECK(rows.dim() == 3 && rows.size(1) == 2 && rows.size(2) == x.size(1), "rows must be (n, 2, d)");
    TORCH_CHECK(union_pos.scalar_type() == torch::kInt64 && union_pos.is_contiguous() && union_pos.dim() == 2 &&
                    union_pos.size(0) == x.size(0), "union_pos must be (T, K) int64");
    if (gate.numel()) {
        check_rows(gate, "gate");
        TORCH_CHECK(gate.sizes() == union_pos.sizes(), "gate must be (T, K) like union_pos");
    }
}

// Entries grouped by id with a counting sort: the entries of id u are order[start[u]] .. order[start[u + 1] - 1].
// Lets the gradient of each row (or expert) be summed by one thread, without atomics or races.
struct EntryGroups {
    std::vector<int64_t> start, order;
};

inline EntryGroups group_entries(const int64_t* id, int64_t entries, int64_t n) {
    EntryGroups groups{std::vector<int64_t>(n + 1, 0), std::vector<int64_t>(entries)};
    for (int64_t e = 0; e < entries; ++e) ++groups.start[id[e] + 1];
    for (int64_t u = 0; u < n; ++u) groups.start[u + 1] += groups.start[u];
    std::vector<int64_t> fill(groups.start.begin(), groups.start.end() - 1);
    for (int64_t e = 0; e < entries; ++e) groups.order[fill[id[e]]++] = e;
    return groups;
}


}  // namespace meft

// adapter.cpp
std::tuple<int64_t, bool> accumulate_rows_(torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of,
                                           int64_t count, torch::Tensor ids, torch::Tensor grads,
                                           torch::Tensor has_grad, int64_t threads);
void sort_accumulated_(torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of, int64_t count);
std::vector<torch::Tensor> sparse_adapter_forward(torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos,
                                                  torch::Tensor gate, int64_t threads);
std::tuple<torch::Tensor, torch::Tensor, int64_t, bool> sparse_adapter_backward(
    torch::Tensor grad_out, torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos, torch::Tensor gate,
    torch::Tensor scores, torch::Tensor row_ids, torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of,
    int64_t count, int64_t round_to, int64_t threads);
