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


// SIMD vectors through GCC's vector extensions, as wide as the build's target (-march=native) allows; loads and
// stores need no alignment. The kernels below keep one such vector per row they work on in a register.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float)), may_alias));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
inline float lane_sum(vec v) {
    float sum = 0.0f;
    for (int64_t i = 0; i < kLanes; ++i) sum += v[i];
    return sum;
}

// out[i][j] = a[i] . b[j] for i < A, j < G: each chunk of a row is loaded once for all the rows of the other side
// (A + G loads per A * G multiply-adds), and the A * G sums are independent chains, so multiply-adds do not wait on
// each other's latency. Each sum runs over the same chunks in the same order whatever A and G are, so a product's
// value does not depend on the rows it was computed beside.
template <int A, int G>
inline void dots(const float* const (&a)[A], const float* const (&b)[G], int64_t n, float (&out)[A][G]) {
    vec acc[A][G] = {};
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes) {
        vec bv[G];
        for (int j = 0; j < G; ++j) bv[j] = load(b[j] + c);
        for (int i = 0; i < A; ++i) {
            const vec av = load(a[i] + c);
            for (int j = 0; j < G; ++j) acc[i][j] += av * bv[j];
        }
    }
    for (int i = 0; i < A; ++i) {
        for (int j = 0; j < G; ++j) {
            float sum = lane_sum(acc[i][j]);
            for (int64_t k = c; k < n; ++k) sum += a[i][k] * b[j][k];
            out[i][j] = sum;
        }
    }
}

// out[j] = a . b[j] for j < G
template <int G>
inline void dots(const float* a, const float* const (&b)[G], int64_t n, float (&out)[G]) {
    const float* rows[1] = {a};
    dots<1, G>(rows, b, n, reinterpret_cast<float(&)[1][G]>(out));
}

// y += sum_j alpha[j] * x[j] for j < G: each chunk of y is loaded and stored once for the G rows
template <int G>
inline void axpys(const float (&alpha)[G], const float* const (&x)[G], float* y, int64_t n) {
    int64_t c = 0;
    for (; c + kLanes <= n; c += kLanes) {
        vec yv = load(y + c);
        for (int j = 0; j < G; ++j) yv += alpha[j] * load(x[j] + c);
        store(y + c, yv);
    }
    for (; c < n; ++c) {
        for (int j = 0; j < G; ++j) y[c] += alpha[j] * x[j][c];
    }
}

// out = sum_q alpha[q] * x[q] over count rows (n values each), 4 vectors of columns at a time in registers: one load
// per multiply-add, and out written once (no zero-fill, no read-modify-write per row). count 0 writes zeros.
inline void weighted_sum(const float* const* x, const float* alpha, int64_t count, int64_t n, float* out) {
    constexpr int64_t kChunk = 4 * kLanes;
    int64_t c0 = 0;
    for (; c0 + kChunk <= n; c0 += kChunk) {
        vec acc[4] = {};
        for (int64_t q = 0; q < count; ++q) {
            for (int i = 0; i < 4; ++i) acc[i] += alpha[q] * load(x[q] + c0 + i * kLanes);
        }
        for (int i = 0; i < 4; ++i) store(out + c0 + i * kLanes, acc[i]);
    }
    for (; c0 < n; ++c0) {
        float sum = 0.0f;
        for (int64_t q = 0; q < count; ++q) sum += alpha[q] * x[q][c0];
        out[c0] = sum;
    }
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
std::vector<torch::Tensor> sparse_adapter_forward(torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos,
                                                  torch::Tensor gate, torch::Tensor known_scores, int64_t threads);
std::tuple<torch::Tensor, torch::Tensor, int64_t, bool> sparse_adapter_backward(
    torch::Tensor grad_out, torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos, torch::Tensor gate,
    torch::Tensor scores, torch::Tensor row_ids, torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of,
    int64_t count, int64_t round_to, int64_t threads);
