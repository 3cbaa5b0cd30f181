// CPU kernels of meft_ds, built by meft_ds.ops.MeftCPUBuilder like DeepSpeed's own CPU ops
// (-O3 -march=native -fopenmp, the SIMD width chosen with py-cpuinfo).
//
//   row_adamw_     AdamW in place on the touched rows of a row store (no gather/scatter copies), bias correction
//                  by the global step or by each row's own step count
//   all_finite     whether a gradient tensor holds no NaN or inf (the optimizer's skip test), one read pass
//   accumulate_rows_ / sort_accumulated_
//                  row gradients into a packed accumulator (meft_ds/accumulator.py), finiteness checked on the way
//   gather_rows    rows of the fp32 store into a staging buffer, cast to the dtype rows travel in
//   score_probed   h_t . k_j for the keys of each token's probed experts, expert-major for cache reuse
//   sparse_adapter_forward / _backward
//                  the adapter over each token's own K rows, T*K*d work instead of T*|U|*d (CPU compute)
//   gate_backward  the router's gradient through those slots' gates, ~T*n_probe*d work instead of T*E*d
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

void check_rows(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a CPU float32 tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

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

// ---------------------------------------------------------------------------------------------------------------
// The packed row-gradient accumulator of meft_ds/accumulator.py: acc (capacity, 2, d) fp32 holds the gradient of row
// acc_ids[s] in slot s < count; slot_of (num_ids,) int64 maps a row id to its slot, -1 for none. A row's first
// gradient is copied into the next free slot (no zero-fill), later ones are added in place; the finiteness of every
// value written is checked on the way, while it is in a register (so the optimizer needs no read pass to check it).

namespace {

struct Accumulator {
    float* rows;
    int64_t* ids;
    int64_t* slot_of;
    int64_t count, capacity, num_ids, width;
};

Accumulator accumulator_of(torch::Tensor& acc, torch::Tensor& acc_ids, torch::Tensor& slot_of, int64_t count) {
    check_rows(acc, "acc");
    TORCH_CHECK(acc_ids.scalar_type() == torch::kInt64 && acc_ids.is_contiguous() && acc_ids.numel() == acc.size(0),
                "acc_ids must be (capacity,) int64");
    TORCH_CHECK(slot_of.scalar_type() == torch::kInt64 && slot_of.is_contiguous(), "slot_of must be int64");
    TORCH_CHECK(count >= 0 && count <= acc.size(0), "count out of range");
    return {acc.data_ptr<float>(), acc_ids.data_ptr<int64_t>(), slot_of.data_ptr<int64_t>(), count, acc.size(0),
            slot_of.numel(), acc.numel() / std::max<int64_t>(1, acc.size(0))};
}

// The slot of row id (taking the next free one if it has none).
int64_t slot_for(Accumulator& a, int64_t id) {
    TORCH_CHECK(id >= 0 && id < a.num_ids, "row id ", id, " out of range [0, ", a.num_ids, ")");
    int64_t& slot = a.slot_of[id];
    if (slot < 0) {
        TORCH_CHECK(a.count < a.capacity, "the gradient accumulator is full (", a.capacity, " rows)");
        slot = a.count;
        a.ids[a.count++] = id;
    }
    return slot;
}

// Row g (width values) into accumulator row dst: copied when fresh, else added. Whether every value written is
// finite (x * 0 is 0 exactly for a finite x, NaN otherwise).
template <typename in_t>
bool commit_row(const in_t* g, float* dst, int64_t width, bool fresh) {
    float zero = 0.0f;
    if (fresh) {
#pragma omp simd reduction(+ : zero)
        for (int64_t j = 0; j < width; ++j) {
            const float v = static_cast<float>(g[j]);
            dst[j] = v;
            zero += v * 0.0f;
        }
    } else {
#pragma omp simd reduction(+ : zero)
        for (int64_t j = 0; j < width; ++j) {
            const float v = dst[j] + static_cast<float>(g[j]);
            dst[j] = v;
            zero += v * 0.0f;
        }
    }
    return zero == 0.0f;
}

template <typename in_t>
int64_t commit_rows(const in_t* g, const int64_t* slot, int64_t n, const Accumulator& a, int64_t first_new,
                    int64_t threads) {
    int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : nonfinite)
    for (int64_t i = 0; i < n; ++i) {
        if (slot[i] < 0) continue;
        if (!commit_row(g + i * a.width, a.rows + slot[i] * a.width, a.width, slot[i] >= first_new)) ++nonfinite;
    }
    return nonfinite;
}

// Give back the slots in ``released`` (taken in this call, rows that turned out to have no gradient): the last
// slots move into the holes, so the used slots stay packed.
void release_slots(Accumulator& a, std::vector<int64_t> released) {
    std::sort(released.begin(), released.end(), std::greater<int64_t>());
    for (const int64_t hole : released) {  // descending: every slot above the hole is in use
        a.slot_of[a.ids[hole]] = -1;
        const int64_t last = --a.count;
        if (hole != last) {
            std::copy(a.rows + last * a.width, a.rows + (last + 1) * a.width, a.rows + hole * a.width);
            a.ids[hole] = a.ids[last];
            a.slot_of[a.ids[hole]] = hole;
        }
    }
}

}  // namespace

// Add grads (n, 2, d) of fp32/bf16/fp16 to rows ids (n,) (unique) of the accumulator, skipping rows whose has_grad
// (n,) bool is false (has_grad empty: all rows). Slots are taken in the order of ids. Returns (count, finite).
std::tuple<int64_t, bool> accumulate_rows_(torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor slot_of,
                                           int64_t count, torch::Tensor ids, torch::Tensor grads,
                                           torch::Tensor has_grad, int64_t threads) {
    Accumulator a = accumulator_of(acc, acc_ids, slot_of, count);
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.dim() == 1, "ids must be int64 1-D");
    const int64_t n = ids.size(0);
    TORCH_CHECK(grads.is_contiguous() && grads.numel() == n * a.width, "grads must be (n, 2, d) and contiguous");
    TORCH_CHECK(!has_grad.numel() || (has_grad.scalar_type() == torch::kBool && has_grad.numel() == n &&
                                      has_grad.is_contiguous()), "has_grad must be (n,) bool or empty");
    const int64_t* id = ids.data_ptr<int64_t>();
    const bool* has = has_grad.numel() ? has_grad.data_ptr<bool>() : nullptr;
    const int64_t first_new = a.count;
    std::vector<int64_t> slot(n, -1);
    for (int64_t i = 0; i < n; ++i) {
        if (!has || has[i]) slot[i] = slot_for(a, id[i]);
    }
    int64_t nonfinite = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, grads.scalar_type(), "accumulate_rows_", [&] {
        nonfinite = commit_rows(grads.data_ptr<scalar_t>(), slot.data(), n, a, first_new, threads);
    });
    return {a.count, nonfinite == 0};
}

// Reorder the first count slots by row id, in place (each cycle of the permutation with one row held aside).
void sort_accumulated_(torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor slot_of, int64_t count) {
    Accumulator a = accumulator_of(acc, acc_ids, slot_of, count);
    std::vector<int64_t> order(count);
    for (int64_t i = 0; i < count; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a.ids[x] < a.ids[y]; });
    std::vector<float> held(a.width);
    std::vector<char> placed(count, 0);
    auto row = [&](int64_t s) { return a.rows + s * a.width; };
    for (int64_t start = 0; start < count; ++start) {
        if (placed[start]) continue;
        std::copy(row(start), row(start) + a.width, held.begin());
        const int64_t held_id = a.ids[start];
        for (int64_t j = start;;) {  // slot j takes the row in slot order[j]
            const int64_t k = order[j];
            placed[j] = 1;
            if (k == start) {
                std::copy(held.begin(), held.end(), row(j));
                a.ids[j] = held_id;
                break;
            }
            std::copy(row(k), row(k) + a.width, row(j));
            a.ids[j] = a.ids[k];
            j = k;
        }
    }
    for (int64_t s = 0; s < count; ++s) a.slot_of[a.ids[s]] = s;
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

    // pairs (token, probe slot) of the experts held here, bucketed by expert: counting sort
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
        for (int64_t q = start[e]; q < start[e + 1]; ++q) {
            const int64_t pair = pairs[q];
            const int64_t token = pair / probes, slot = pair % probes;
            const float* x = h + token * dim;
            float* target = out + token * probes * expert_size + slot * expert_size;
            for (int64_t j = 0; j < expert_size; ++j) {
                const float* key = key_base + (e * expert_size + j) * key_stride;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t c = 0; c < dim; ++c) dot += x[c] * key[c];
                target[j] = dot;
            }
        }
    }
    return scores;
}

// ---------------------------------------------------------------------------------------------------------------
// The sparse adapter on the CPU. x: (T, d) fp32; rows: (n, 2, d) fp32 (key, value of each fetched row);
// slots: (T, K) int64 positions in rows; gate: (T, K) fp32 router logit of each slot's expert, or an empty tensor
// (ungated). Per token: pre_k = gate_k * (x . key_k), out = sum_k ReLU(pre_k) * value_k.

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) sum += a[c] * b[c];
    return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

void check_adapter_inputs(const torch::Tensor& x, const torch::Tensor& rows, const torch::Tensor& slots,
                          const torch::Tensor& gate) {
    check_rows(x, "x");
    check_rows(rows, "rows");
    TORCH_CHECK(rows.dim() == 3 && rows.size(1) == 2 && rows.size(2) == x.size(1), "rows must be (n, 2, d)");
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.is_contiguous() && slots.dim() == 2 &&
                    slots.size(0) == x.size(0), "slots must be (T, K) int64");
    if (gate.numel()) {
        check_rows(gate, "gate");
        TORCH_CHECK(gate.sizes() == slots.sizes(), "gate must be (T, K) like slots");
    }
}

// Entries grouped by id with a counting sort: the entries of id u are order[start[u]] .. order[start[u + 1] - 1].
// Lets the gradient of each row (or expert) be summed by one thread, without atomics or races.
struct EntryGroups {
    std::vector<int64_t> start, order;
};

EntryGroups group_entries(const int64_t* id, int64_t entries, int64_t n) {
    EntryGroups groups{std::vector<int64_t>(n + 1, 0), std::vector<int64_t>(entries)};
    for (int64_t e = 0; e < entries; ++e) ++groups.start[id[e] + 1];
    for (int64_t u = 0; u < n; ++u) groups.start[u + 1] += groups.start[u];
    std::vector<int64_t> fill(groups.start.begin(), groups.start.end() - 1);
    for (int64_t e = 0; e < entries; ++e) groups.order[fill[id[e]]++] = e;
    return groups;
}

}  // namespace

// returns (out (T, d), scores (T, K) = x . key per slot, kept for backward)
std::vector<torch::Tensor> sparse_adapter_forward(torch::Tensor x, torch::Tensor rows, torch::Tensor slots,
                                                  torch::Tensor gate, int64_t threads) {
    check_adapter_inputs(x, rows, slots, gate);
    const int64_t tokens = x.size(0), dim = x.size(1), top_k = slots.size(1), n = rows.size(0);
    auto out = torch::zeros_like(x);
    auto scores = torch::empty({tokens, top_k}, x.options());
    const float* xs = x.data_ptr<float>();
    const float* r = rows.data_ptr<float>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const float* g = gate.numel() ? gate.data_ptr<float>() : nullptr;
    float* o = out.data_ptr<float>();
    float* sc = scores.data_ptr<float>();
    for (int64_t e = 0; e < tokens * top_k; ++e) TORCH_CHECK(slot[e] >= 0 && slot[e] < n, "slot out of range");
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t k = 0; k < top_k; ++k) {
            const int64_t e = t * top_k + k;
            const float* key = r + slot[e] * 2 * dim;
            const float score = dot(xs + t * dim, key, dim);
            sc[e] = score;
            const float pre = g ? g[e] * score : score;
            if (pre > 0.0f) axpy(pre, key + dim, o + t * dim, dim);
        }
    }
    return {out, scores};
}

// Returns (grad_x (T, d), grad_gate (T, K) or empty, count, finite). The gradient of fetched row u (id row_ids[u])
// goes straight into the accumulator (see accumulate_rows_), written once: each row's gradient is summed in a
// thread's scratch row (in cache), rounded to the precision rows travel in (round_to: 0 fp32, 1 bf16, 2 fp16, as the
// copy to the host would), then copied or added into its slot. Rows whose gradient is all zero (selected, but
// inactive for every token that chose them) take no slot.
std::tuple<torch::Tensor, torch::Tensor, int64_t, bool> sparse_adapter_backward(
    torch::Tensor grad_out, torch::Tensor x, torch::Tensor rows, torch::Tensor slots, torch::Tensor gate,
    torch::Tensor scores, torch::Tensor row_ids, torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor slot_of,
    int64_t count, int64_t round_to, int64_t threads) {
    check_adapter_inputs(x, rows, slots, gate);
    check_rows(grad_out, "grad_out");
    Accumulator a = accumulator_of(acc, acc_ids, slot_of, count);
    const int64_t tokens = x.size(0), dim = x.size(1), top_k = slots.size(1), n = rows.size(0);
    TORCH_CHECK(row_ids.scalar_type() == torch::kInt64 && row_ids.is_contiguous() && row_ids.numel() == n,
                "row_ids must be (n,) int64");
    TORCH_CHECK(a.width == 2 * dim, "the accumulator's rows must be (2, d)");
    const int64_t entries = tokens * top_k;
    auto grad_x = torch::zeros_like(x);
    auto grad_gate = gate.numel() ? torch::empty_like(gate) : torch::empty({0}, x.options());
    std::vector<float> act(entries), grad_score(entries);
    std::vector<char> live(tokens);  // the token's output gradient is not all zero (a padding token's often is)
    const float* xs = x.data_ptr<float>();
    const float* dout = grad_out.data_ptr<float>();
    const float* r = rows.data_ptr<float>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const float* g = gate.numel() ? gate.data_ptr<float>() : nullptr;
    const float* sc = scores.data_ptr<float>();
    const int64_t* row_id = row_ids.data_ptr<int64_t>();
    float* dx = grad_x.data_ptr<float>();
    float* dg = gate.numel() ? grad_gate.data_ptr<float>() : nullptr;

    // token-parallel: d pre = (d out . value) on active slots; gate and x gradients
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) {
        bool nonzero = false;
        for (int64_t c = 0; c < dim && !nonzero; ++c) nonzero = dout[t * dim + c] != 0.0f;
        live[t] = nonzero;
        for (int64_t k = 0; k < top_k; ++k) {
            const int64_t e = t * top_k + k;
            const float* key = r + slot[e] * 2 * dim;
            const float pre = g ? g[e] * sc[e] : sc[e];
            const float grad_pre = pre > 0.0f && nonzero ? dot(dout + t * dim, key + dim, dim) : 0.0f;
            act[e] = pre > 0.0f ? pre : 0.0f;
            if (dg) dg[e] = grad_pre * sc[e];
            grad_score[e] = g ? grad_pre * g[e] : grad_pre;
            if (grad_score[e] != 0.0f) axpy(grad_score[e], key, dx + t * dim, dim);
        }
    }
    // slots for the rows that get a gradient, taken in the order of U (serially: the layout is deterministic)
    const EntryGroups by_row = group_entries(slot, entries, n);
    const int64_t first_new = a.count;
    std::vector<int64_t> target(n, -1);
    for (int64_t u = 0; u < n; ++u) {
        bool contributes = false;
        for (int64_t q = by_row.start[u]; q < by_row.start[u + 1] && !contributes; ++q) {
            const int64_t e = by_row.order[q];
            contributes = (act[e] > 0.0f && live[e / top_k]) || grad_score[e] != 0.0f;
        }
        if (contributes) target[u] = slot_for(a, row_id[u]);
    }
    // row-parallel over the entries of each row: d value_u, d key_u without races
    std::vector<char> came_out_zero(n, 0);
    int64_t nonfinite = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite)
    {
        std::vector<float> scratch(2 * dim);
#pragma omp for schedule(dynamic, 16)
        for (int64_t u = 0; u < n; ++u) {
            if (target[u] < 0) continue;
            float* grad_key = scratch.data();
            float* grad_value = grad_key + dim;
            std::fill(scratch.begin(), scratch.end(), 0.0f);
            for (int64_t q = by_row.start[u]; q < by_row.start[u + 1]; ++q) {
                const int64_t e = by_row.order[q], t = e / top_k;
                if (act[e] > 0.0f) axpy(act[e], dout + t * dim, grad_value, dim);
                if (grad_score[e] != 0.0f) axpy(grad_score[e], xs + t * dim, grad_key, dim);
            }
            if (round_to == 1) {
                for (int64_t j = 0; j < 2 * dim; ++j) scratch[j] = static_cast<float>(c10::BFloat16(scratch[j]));
            } else if (round_to == 2) {
                for (int64_t j = 0; j < 2 * dim; ++j) scratch[j] = static_cast<float>(c10::Half(scratch[j]));
            }
            bool nonzero = false;
            for (int64_t j = 0; j < 2 * dim && !nonzero; ++j) nonzero = scratch[j] != 0.0f;
            if (!nonzero) {  // cancelled or underflowed to zero: not touched (a slot taken for it is given back)
                came_out_zero[u] = target[u] >= first_new;
                continue;
            }
            if (!commit_row(scratch.data(), a.rows + target[u] * a.width, a.width, target[u] >= first_new)) ++nonfinite;
        }
    }
    std::vector<int64_t> released;
    for (int64_t u = 0; u < n; ++u) {
        if (came_out_zero[u]) released.push_back(target[u]);
    }
    release_slots(a, released);
    return {grad_x, grad_gate, a.count, nonfinite == 0};
}

// The router's gradient through the gate of each slot, gate[t][k] = x_t . W[experts[t][k]] (the router logit of the
// slot's expert). A token's K slots fall in its n_probe probed experts, so their gate gradients are first summed per
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
    auto grad_x = torch::zeros_like(x);
    auto grad_weight = torch::zeros_like(weight);
    float* dx = grad_x.data_ptr<float>();
    float* dw = grad_weight.data_ptr<float>();
    // token t's distinct experts and summed gradients in pair_*[t*K .. t*K + count); unused entries keep the id E
    std::vector<int64_t> pair_expert(entries, num_experts);
    std::vector<float> pair_grad(entries, 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t base = t * top_k;
        int64_t count = 0;
        for (int64_t k = 0; k < top_k; ++k) {
            if (g[base + k] == 0.0f) continue;
            int64_t i = 0;
            while (i < count && pair_expert[base + i] != expert[base + k]) ++i;
            if (i == count) pair_expert[base + count++] = expert[base + k];
            pair_grad[base + i] += g[base + k];
        }
        for (int64_t i = 0; i < count; ++i) axpy(pair_grad[base + i], w + pair_expert[base + i] * dim, dx + t * dim, dim);
    }
    const EntryGroups by_expert = group_entries(pair_expert.data(), entries, num_experts + 1);
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t u = 0; u < num_experts; ++u) {
        for (int64_t q = by_expert.start[u]; q < by_expert.start[u + 1]; ++q) {
            const int64_t e = by_expert.order[q];
            axpy(pair_grad[e], xs + (e / top_k) * dim, dw + u * dim, dim);
        }
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
    m.def("sort_accumulated_", &sort_accumulated_, "the accumulator's used slots in row id order, in place");
    m.def("gather_rows", &gather_rows, "gather fp32 rows into a buffer of the travel dtype");
    m.def("score_probed", &score_probed, "scores of the probed experts' keys, grouped by expert");
    m.def("sparse_adapter_forward", &sparse_adapter_forward, "adapter output over each token's own K rows");
    m.def("sparse_adapter_backward", &sparse_adapter_backward, "gradients of x and gate; the fetched rows' into the accumulator");
    m.def("gate_backward", &gate_backward, "the router's gradient through the slots' gates, pairs in use only");
}
