// CPU kernels of meft_ds, built by meft_ds.ops.MeftCPUBuilder like DeepSpeed's own CPU ops (-O3 -march=native
// -fopenmp, the SIMD width chosen with py-cpuinfo) into one module with adapter.cpp (the adapter's forward and
// backward, and the row-gradient accumulator). This file:
//
//   row_adamw_     AdamW in place on the touched rows of a row store (no gather/scatter copies), bias correction
//                  by the global step or by each row's own step count
//   all_finite     whether a gradient tensor holds no NaN or inf (the optimizer's skip test), one read pass
//   gather_rows    rows of the fp32 store into a staging buffer, cast to the dtype rows travel in
//   score_probed   h_t . k_j for the keys of each token's probed experts, expert-major for cache reuse
//   select_top_k   each token's top-K rows among its probed experts' scores, and their union
//   gate_backward  the router's gradient through the picks' gates, ~T*n_probe*d work instead of T*E*d
#include "common.h"

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

using meft::check_rows;
using meft::EntryGroups;
using meft::group_entries;

// params, exp_avg, exp_avg_sq: (num_rows, width) fp32; ids: (n,) int64; grads: (n, width) fp32, row i of grads
// belongs to row ids[i]. The arithmetic follows torch.optim.AdamW's single-tensor path operation by operation,
// except that sqrt(v) / sqrt(bias_correction2) multiplies by the reciprocal instead (at most one rounding apart):
// the kernel is memory bound, but the two divisions per element took about a third of the time a core has per
// element at the dense kernel's bandwidth, and one of them is the step's constant.
// row_steps: None or empty (bias correction by the global ``step``), or (num_rows,) int32 counts of each row's
// updates, incremented here, each row then corrected by its own count (a row's first update is a fresh Adam's first).
void row_adamw_(torch::Tensor params, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor ids,
                torch::Tensor grads, int64_t step, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t threads, const c10::optional<torch::Tensor>& steps_per_row) {
    check_rows(params, "params");
    check_rows(exp_avg, "exp_avg");
    check_rows(exp_avg_sq, "exp_avg_sq");
    check_rows(grads, "grads");
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.dim() == 1, "ids must be int64 1-D");
    const int64_t n = ids.size(0);
    const int64_t width = params.numel() / params.size(0);
    TORCH_CHECK(grads.numel() == n * width, "grads must hold one row of ", width, " values per id");
    TORCH_CHECK(exp_avg.sizes() == params.sizes() && exp_avg_sq.sizes() == params.sizes(), "moment shapes differ");
    const int64_t num_rows = params.size(0);
    const torch::Tensor row_steps = steps_per_row.value_or(torch::Tensor());
    const bool per_row = row_steps.defined() && row_steps.numel() > 0;
    TORCH_CHECK(!per_row || (row_steps.scalar_type() == torch::kInt32 && row_steps.is_contiguous() &&
                             row_steps.numel() == num_rows), "row_steps must be (num_rows,) int32 or empty");

    const float decay = static_cast<float>(1.0 - lr * weight_decay);
    const float one_minus_beta1 = static_cast<float>(1.0 - beta1);
    const float b2 = static_cast<float>(beta2);
    const float one_minus_beta2 = static_cast<float>(1.0 - beta2);
    auto step_size_at = [&](int64_t t) {
        return static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(t))));
    };
    auto inv_bias_correction2_sqrt_at = [&](int64_t t) {
        return static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(t))));
    };
    const float global_step_size = step_size_at(step);
    const float global_inv_bias_correction2_sqrt = inv_bias_correction2_sqrt_at(step);
    int32_t* steps = per_row ? row_steps.data_ptr<int32_t>() : nullptr;
    const float epsilon = static_cast<float>(eps);

    float* p_all = params.data_ptr<float>();
    float* m_all = exp_avg.data_ptr<float>();
    float* v_all = exp_avg_sq.data_ptr<float>();
    const float* g_all = grads.data_ptr<float>();
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(id[i] >= 0 && id[i] < num_rows, "row id ", id[i], " out of range [0, ", num_rows, ")");
    }

    // rows are handed out in chunks of ~128 KB per tensor as threads come free rather than in one static share
    // each: on a shared machine one thread often starts late or is preempted, and the others then take its rows
    // instead of waiting for it at the end (measured about level with static when the cores are idle)
    const int64_t rows_per_chunk = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width));
#pragma omp parallel for schedule(dynamic, rows_per_chunk) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
        float* p = p_all + id[i] * width;
        float* m = m_all + id[i] * width;
        float* v = v_all + id[i] * width;
        const float* g = g_all + i * width;
        float step_size = global_step_size, inv_bias_correction2_sqrt = global_inv_bias_correction2_sqrt;
        if (per_row) {
            const int64_t t = ++steps[id[i]];
            step_size = step_size_at(t);
            inv_bias_correction2_sqrt = inv_bias_correction2_sqrt_at(t);
        }
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
            const float grad = g[j];
            const float param = p[j] * decay;
            const float mean = m[j] + one_minus_beta1 * (grad - m[j]);  // lerp, as torch does for weights < 0.5
            const float var = v[j] * b2 + one_minus_beta2 * (grad * grad);
            const float denom = std::sqrt(var) * inv_bias_correction2_sqrt + epsilon;
            m[j] = mean;
            v[j] = var;
            p[j] = param - step_size * (mean / denom);
        }
    }
}

// Whether every element of t (fp32, contiguous, any shape) is finite. x * 0 is 0 for a finite x and NaN for inf
// or NaN, so a sum of x * 0 is 0 exactly when all x are finite: plain vectorized adds, no compares or branches per
// element, and exact whatever the order. The check is a pure read of the gradients before the update reads them
// again, so its speed matters: one sequential stream per thread read only ~20 GB/s on 2 cores where the update's
// four streams per thread reach the dense kernel's ~30, so each thread reads kStreams distant parts of the tensor
// in lockstep (more misses in flight), into kLanes partial sums (no single add chain). Once a bad value is found
// the threads skip their remaining blocks.
bool all_finite(torch::Tensor t, int64_t threads) {
    check_rows(t, "t");
    constexpr int64_t kStreams = 4, kBlock = 4096, kLanes = 64;
    const float* x = t.data_ptr<float>();
    const int64_t n = t.numel();
    const int64_t steps = n / (kStreams * kBlock);  // step i reads block i of every stream
    const int64_t stream_size = steps * kBlock;
    std::atomic<bool> finite{true};
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < steps; ++i) {
        if (!finite.load(std::memory_order_relaxed)) continue;
        float lanes[kLanes] = {};
        for (int64_t j = i * kBlock; j < (i + 1) * kBlock; j += kLanes) {
            for (int64_t s = 0; s < kStreams; ++s) {
                const float* block = x + s * stream_size + j;
#pragma omp simd
                for (int64_t l = 0; l < kLanes; ++l) lanes[l] += block[l] * 0.0f;
            }
        }
        float zero = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) zero += lanes[l];
        if (zero != 0.0f) finite.store(false, std::memory_order_relaxed);  // NaN != 0
    }
    float zero = 0.0f;  // the tail past the streams, fewer than kStreams * kBlock elements
    for (int64_t j = kStreams * stream_size; j < n; ++j) zero += x[j] * 0.0f;
    return finite.load() && zero == 0.0f;
}

// One row at a time, cast element-wise (round to nearest even, as torch's .to(dtype)). A function of its own
// because OpenMP pragmas cannot sit inside the AT_DISPATCH macro's argument.
template <typename scalar_t>
void gather_cast(const float* source, const int64_t* id, int64_t n, int64_t width, scalar_t* target,
                 int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) {
        const float* row = source + id[i] * width;
        scalar_t* dst = target + i * width;
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(row[j]);
    }
}

// src: (num_rows, width) fp32; ids: (n,) int64; out: (>= n, width) of float32/bfloat16/float16, contiguous.
void gather_rows(torch::Tensor src, torch::Tensor ids, torch::Tensor out, int64_t threads) {
    check_rows(src, "src");
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.dim() == 1, "ids must be int64 1-D");
    TORCH_CHECK(out.is_contiguous() && out.device().is_cpu(), "out must be a contiguous CPU tensor");
    const int64_t n = ids.size(0);
    const int64_t width = src.numel() / src.size(0);
    const int64_t num_rows = src.size(0);
    TORCH_CHECK(out.numel() >= n * width, "out is too small for ", n, " rows");
    const float* source = src.data_ptr<float>();
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(id[i] >= 0 && id[i] < num_rows, "row id ", id[i], " out of range [0, ", num_rows, ")");
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, out.scalar_type(), "gather_rows", [&] {
        gather_cast(source, id, n, width, out.data_ptr<scalar_t>(), threads);
    });
}

namespace {

constexpr int kTokens = 4, kKeys = 4;  // a block of score_probed: tokens x keys of one expert at once

// Scores of T (token, probe) pairs of one expert against all its keys (expert_size of them, key_stride apart).
template <int T>
void score_block(const int64_t* pair, const float* h, const float* key, int64_t key_stride, int64_t expert_size,
                 int64_t probes, int64_t dim, float* out) {
    const float* x[T];
    float* target[T];
    for (int i = 0; i < T; ++i) {
        const int64_t token = pair[i] / probes, nth = pair[i] % probes;
        x[i] = h + token * dim;
        target[i] = out + (token * probes + nth) * expert_size;
    }
    int64_t j = 0;
    for (; j + kKeys <= expert_size; j += kKeys) {
        const float* keys[kKeys];
        for (int k = 0; k < kKeys; ++k) keys[k] = key + (j + k) * key_stride;
        float block[T][kKeys];
        meft::dots<T, kKeys>(x, keys, dim, block);
        for (int i = 0; i < T; ++i) std::copy(block[i], block[i] + kKeys, target[i] + j);
    }
    for (; j < expert_size; ++j) {
        const float* keys[1] = {key + j * key_stride};
        float block[T][1];
        meft::dots<T, 1>(x, keys, dim, block);
        for (int i = 0; i < T; ++i) target[i][j] = block[i][0];
    }
}

}  // namespace

// hidden: (T, d) fp32 contiguous; probe_ids: (T, P) int64; keys: the keys of experts [first_expert, first_expert +
// keys.size(0) / expert_size), fp32 with unit inner stride and any row stride; returns (T, P * expert_size) with
// column p * expert_size + j = h_t . key of neuron j of probed expert p, and 0 for experts outside those keys (a
// sharded store scores the experts it owns; the owners' results are summed). Work is grouped by expert, so an
// expert's keys are read from memory once and reused by all tokens probing it.
torch::Tensor score_probed(torch::Tensor hidden, torch::Tensor probe_ids, torch::Tensor keys, int64_t expert_size,
                           int64_t first_expert, int64_t threads) {
    check_rows(hidden, "hidden");
    TORCH_CHECK(probe_ids.scalar_type() == torch::kInt64 && probe_ids.is_contiguous(), "probe_ids must be int64");
    TORCH_CHECK(keys.scalar_type() == torch::kFloat32 && keys.stride(1) == 1, "keys must be fp32 with unit stride");
    const int64_t tokens = hidden.size(0), dim = hidden.size(1), probes = probe_ids.size(1);
    const int64_t key_stride = keys.stride(0);
    const int64_t num_experts = keys.size(0) / expert_size;  // the experts these keys hold
    const int64_t* probe = probe_ids.data_ptr<int64_t>();

    // pairs (token, probe) of the experts held here, bucketed by expert: counting sort
    std::vector<int64_t> start(num_experts + 1, 0);
    auto held = [&](int64_t k) { return probe[k] >= first_expert && probe[k] < first_expert + num_experts; };
    for (int64_t k = 0; k < tokens * probes; ++k) {
        TORCH_CHECK(probe[k] >= 0, "expert id ", probe[k], " out of range");
        if (held(k)) ++start[probe[k] - first_expert + 1];
    }
    for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
    std::vector<int64_t> pairs(start[num_experts]);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < tokens * probes; ++k) {
        if (held(k)) pairs[fill[probe[k] - first_expert]++] = k;
    }

    auto scores = torch::zeros({tokens, probes * expert_size}, hidden.options());
    float* out = scores.data_ptr<float>();
    const float* h = hidden.data_ptr<float>();
    const float* key_base = keys.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t e = 0; e < num_experts; ++e) {
        const float* key = key_base + e * expert_size * key_stride;
        int64_t q = start[e];
        for (; q + kTokens <= start[e + 1]; q += kTokens) {
            score_block<kTokens>(pairs.data() + q, h, key, key_stride, expert_size, probes, dim, out);
        }
        for (; q < start[e + 1]; ++q) score_block<1>(pairs.data() + q, h, key, key_stride, expert_size, probes, dim, out);
    }
    return scores;
}

// Each token's top_k neurons among its probed experts and their union over the micro-batch: what routing.py's
// top_k_rows and union_of compute with torch ops (a topk, gathers and a presence map), in one pass per token and one
// over the picks. scores: (T, P * expert_size) fp32; probe_ids: (T, P) int64; gates: (T, P) fp32 router logits (a
// neuron then ranks by gate * score, its pre-activation) or empty. Returns (row_ids (n,) sorted unique, union_pos
// (T, K) positions in row_ids, pick_scores (T, K): each pick's score h_t . k_j, ungated, as in scores). NaN ranks
// highest, as in torch.topk; equal values go to the lower column (-0 ranks below +0).
std::vector<torch::Tensor> select_top_k(torch::Tensor scores, torch::Tensor probe_ids, torch::Tensor gates,
                                        int64_t expert_size, int64_t top_k, int64_t threads) {
    check_rows(scores, "scores");
    TORCH_CHECK(probe_ids.scalar_type() == torch::kInt64 && probe_ids.is_contiguous() && probe_ids.dim() == 2 &&
                    probe_ids.size(0) == scores.size(0), "probe_ids must be (T, P) int64");
    const int64_t tokens = scores.size(0), columns = scores.size(1), probes = probe_ids.size(1);
    TORCH_CHECK(columns == probes * expert_size, "scores must be (T, P * expert_size)");
    TORCH_CHECK(top_k >= 1 && top_k <= columns, "top_k must be in [1, ", columns, "]");
    if (gates.numel()) {
        check_rows(gates, "gates");
        TORCH_CHECK(gates.sizes() == probe_ids.sizes(), "gates must be (T, P) like probe_ids");
    }
    const float* s = scores.data_ptr<float>();
    const float* g = gates.numel() ? gates.data_ptr<float>() : nullptr;
    const int64_t* probe = probe_ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < tokens * probes; ++i) TORCH_CHECK(probe[i] >= 0, "expert id ", probe[i], " out of range");
    auto rows = torch::empty({tokens, top_k}, probe_ids.options());
    auto pick_scores = torch::empty({tokens, top_k}, scores.options());
    int64_t* row = rows.data_ptr<int64_t>();
    float* picked = pick_scores.data_ptr<float>();
#pragma omp parallel num_threads(threads)
    {
        std::vector<uint32_t> key(columns);  // each value's bits, mapped so that unsigned order is float order
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t p = 0; p < probes; ++p) {
                for (int64_t j = 0, c = p * expert_size; j < expert_size; ++j, ++c) {
                    float v = g ? g[t * probes + p] * s[t * columns + c] : s[t * columns + c];
                    if (std::isnan(v)) v = std::numeric_limits<float>::infinity();
                    uint32_t bits;
                    std::memcpy(&bits, &v, sizeof bits);
                    key[c] = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
                }
            }
            // the K-th highest key, bit by bit from the top: the highest x with at least K keys >= x (branch-free
            // counts instead of a selection's data-dependent branches, ~4x faster at 256 columns)
            uint32_t threshold = 0;
            for (int bit = 31; bit >= 0; --bit) {
                const uint32_t candidate = threshold | (1u << bit);
                int32_t count = 0;
#pragma omp simd reduction(+ : count)
                for (int64_t c = 0; c < columns; ++c) count += key[c] >= candidate;
                if (count >= top_k) threshold = candidate;
            }
            int64_t above = 0;
            for (int64_t c = 0; c < columns; ++c) above += key[c] > threshold;
            // the columns above it and, lowest first, as many equal to it as fit
            int64_t* out = row + t * top_k;
            int64_t k = 0, equal_left = top_k - above;
            for (int64_t p = 0; p < probes; ++p) {
                for (int64_t j = 0, c = p * expert_size; j < expert_size; ++j, ++c) {
                    if (key[c] > threshold || (key[c] == threshold && equal_left-- > 0)) {
                        picked[t * top_k + k] = s[t * columns + c];
                        out[k++] = probe[t * probes + p] * expert_size + j;
                    }
                }
            }
        }
    }
    const int64_t picks = tokens * top_k;
    const int64_t bound = picks ? *std::max_element(row, row + picks) + 1 : 0;
    std::vector<int64_t> position(bound, -1);
    for (int64_t e = 0; e < picks; ++e) position[row[e]] = 0;
    int64_t n = 0;
    for (int64_t id = 0; id < bound; ++id) {
        if (position[id] == 0) position[id] = n++;
    }
    auto row_ids = torch::empty({n}, probe_ids.options());
    int64_t* ids = row_ids.data_ptr<int64_t>();
    for (int64_t id = 0; id < bound; ++id) {
        if (position[id] >= 0) ids[position[id]] = id;
    }
    for (int64_t e = 0; e < picks; ++e) row[e] = position[row[e]];
    return {row_ids, rows, pick_scores};
}

// The router's gradient through the gate of each pick, gate[t][k] = x_t . W[experts[t][k]] (the router logit of the
// pick's expert). A token's K picks fall in its n_probe probed experts, so their gate gradients are first summed per
// (token, expert) pair; then only those pairs contribute: about T*n_probe*d work for each of grad_x and grad_weight,
// instead of autograd's two dense (T, E, d) products over a (T, E) gradient that is zero almost everywhere.
// grad_gate: (T, K) fp32; x: (T, d); weight: (E, d); experts: (T, K) int64. Returns (grad_x (T, d), grad_weight (E, d)).
std::vector<torch::Tensor> gate_backward(torch::Tensor grad_gate, torch::Tensor x, torch::Tensor weight,
                                         torch::Tensor experts, int64_t threads) {
    check_rows(grad_gate, "grad_gate");
    check_rows(x, "x");
    check_rows(weight, "weight");
    TORCH_CHECK(experts.scalar_type() == torch::kInt64 && experts.is_contiguous() && experts.sizes() == grad_gate.sizes(),
                "experts must be (T, K) int64 like grad_gate");
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) && x.size(0) == grad_gate.size(0),
                "x must be (T, d) and weight (E, d)");
    const int64_t tokens = x.size(0), dim = x.size(1), top_k = experts.size(1), num_experts = weight.size(0);
    const int64_t entries = tokens * top_k;
    const float* g = grad_gate.data_ptr<float>();
    const float* xs = x.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    const int64_t* expert = experts.data_ptr<int64_t>();
    for (int64_t e = 0; e < entries; ++e) {
        TORCH_CHECK(expert[e] >= 0 && expert[e] < num_experts, "expert id ", expert[e], " out of range");
    }
    auto grad_x = torch::empty_like(x);
    auto grad_weight = torch::empty_like(weight);
    float* dx = grad_x.data_ptr<float>();
    float* dw = grad_weight.data_ptr<float>();
    // token t's distinct experts and their summed gradients: pair_*[t * K .. t * K + count[t])
    std::vector<int64_t> pair_expert(entries), count(tokens);
    std::vector<float> pair_grad(entries);
#pragma omp parallel num_threads(threads)
    {
        std::vector<const float*> source(top_k);
        std::vector<int64_t> slot_of(num_experts, -1);  // a token's pair of each expert, while it is summed
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            const int64_t base = t * top_k;
            int64_t n = 0;
            for (int64_t k = 0; k < top_k; ++k) {
                if (g[base + k] == 0.0f) continue;
                int64_t& slot = slot_of[expert[base + k]];
                if (slot < 0) {
                    slot = n++;
                    pair_expert[base + slot] = expert[base + k];
                    pair_grad[base + slot] = 0.0f;
                }
                pair_grad[base + slot] += g[base + k];
            }
            for (int64_t i = 0; i < n; ++i) {
                slot_of[pair_expert[base + i]] = -1;
                source[i] = w + pair_expert[base + i] * dim;
            }
            meft::weighted_sum(source.data(), pair_grad.data() + base, n, dim, dx + t * dim);
            count[t] = n;
        }
    }
    // the pairs packed in token order, then grouped by expert
    std::vector<int64_t> packed_expert;
    std::vector<const float*> packed_x;
    std::vector<float> packed_grad;
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t i = 0; i < count[t]; ++i) {
            packed_expert.push_back(pair_expert[t * top_k + i]);
            packed_x.push_back(xs + t * dim);
            packed_grad.push_back(pair_grad[t * top_k + i]);
        }
    }
    const int64_t pairs = static_cast<int64_t>(packed_expert.size());
    const EntryGroups by_expert = group_entries(packed_expert.data(), pairs, num_experts);
    std::vector<const float*> source(pairs);
    std::vector<float> weight_of(pairs);
    for (int64_t q = 0; q < pairs; ++q) {
        source[q] = packed_x[by_expert.order[q]];
        weight_of[q] = packed_grad[by_expert.order[q]];
    }
    const std::vector<int64_t>& start = by_expert.start;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t u = 0; u < num_experts; ++u) {
        meft::weighted_sum(source.data() + start[u], weight_of.data() + start[u], start[u + 1] - start[u], dim, dw + u * dim);
    }
    return {grad_x, grad_weight};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("row_adamw_", &row_adamw_, "AdamW in place on the rows ids of a row store", py::arg("params"),
          py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("ids"), py::arg("grads"), py::arg("step"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("threads"),
          py::arg("row_steps") = py::none());
    m.def("all_finite", &all_finite, "whether a float32 tensor holds no NaN or inf");
    m.def("accumulate_rows_", &accumulate_rows_, "row gradients into the packed accumulator; (count, finite)");
    m.def("gather_rows", &gather_rows, "gather fp32 rows into a buffer of the travel dtype");
    m.def("score_probed", &score_probed, "scores of the probed experts' keys, grouped by expert");
    m.def("sparse_adapter_forward", &sparse_adapter_forward, "adapter output over each token's own K rows");
    m.def("sparse_adapter_backward", &sparse_adapter_backward, "gradients of x and gate; the fetched rows' into the accumulator");
    m.def("select_top_k", &select_top_k, "each token's top-K rows among its probed experts, their union and scores");
    m.def("gate_backward", &gate_backward, "the router's gradient through the picks' gates, pairs in use only");
}
