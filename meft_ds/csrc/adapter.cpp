// meft_ds's CPU kernels, part 2 (built with meft_cpu.cpp into one module, which binds them):
//
//   accumulate_rows_
//                  row gradients into a packed accumulator (meft_ds/accumulator.py), finiteness checked on the way
//   sparse_adapter_forward / _backward
//                  the adapter over each token's own K rows, T*K*d work instead of T*|U|*d (CPU compute); the
//                  backward writes the rows' gradients into the accumulator
#include "common.h"

#include <algorithm>
#include <functional>

using meft::check_adapter_inputs;
using meft::check_rows;
using meft::EntryGroups;
using meft::group_entries;

// ---------------------------------------------------------------------------------------------------------------
// The packed row-gradient accumulator of meft_ds/accumulator.py: acc (capacity, 2, d) fp32 holds the gradient of row
// acc_ids[e] in entry e < count; entry_of (num_ids,) int64 maps a row id to its entry, -1 for none. A row's first
// gradient is copied into the next free entry (no zero-fill), later ones are added in place; the finiteness of every
// value written is checked on the way, while it is in a register (so the optimizer needs no read pass to check it).

namespace {

struct Accumulator {
    float* rows;
    int64_t* ids;
    int64_t* entry_of;
    int64_t count, capacity, num_ids, width;
};

Accumulator accumulator_of(torch::Tensor& acc, torch::Tensor& acc_ids, torch::Tensor& entry_of, int64_t count) {
    check_rows(acc, "acc");
    TORCH_CHECK(acc_ids.scalar_type() == torch::kInt64 && acc_ids.is_contiguous() && acc_ids.numel() == acc.size(0),
                "acc_ids must be (capacity,) int64");
    TORCH_CHECK(entry_of.scalar_type() == torch::kInt64 && entry_of.is_contiguous(), "entry_of must be int64");
    TORCH_CHECK(count >= 0 && count <= acc.size(0), "count out of range");
    return {acc.data_ptr<float>(), acc_ids.data_ptr<int64_t>(), entry_of.data_ptr<int64_t>(), count, acc.size(0),
            entry_of.numel(), acc.numel() / std::max<int64_t>(1, acc.size(0))};
}

// The entry of row id (taking the next free one if it has none).
int64_t entry_for(Accumulator& a, int64_t id) {
    TORCH_CHECK(id >= 0 && id < a.num_ids, "row id ", id, " out of range [0, ", a.num_ids, ")");
    int64_t& entry = a.entry_of[id];
    if (entry < 0) {
        TORCH_CHECK(a.count < a.capacity, "the gradient accumulator is full (", a.capacity, " rows)");
        entry = a.count;
        a.ids[a.count++] = id;
    }
    return entry;
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
int64_t commit_rows(const in_t* g, const int64_t* entry, int64_t n, const Accumulator& a, int64_t first_new,
                    int64_t threads) {
    int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : nonfinite)
    for (int64_t i = 0; i < n; ++i) {
        if (entry[i] < 0) continue;
        if (!commit_row(g + i * a.width, a.rows + entry[i] * a.width, a.width, entry[i] >= first_new)) ++nonfinite;
    }
    return nonfinite;
}

// Give back the entries in ``released`` (taken in this call, rows that turned out to have no gradient): the last
// entries move into the holes, so the used entries stay packed.
void release_entries(Accumulator& a, std::vector<int64_t> released) {
    std::sort(released.begin(), released.end(), std::greater<int64_t>());
    for (const int64_t hole : released) {  // descending: every entry above the hole is in use
        a.entry_of[a.ids[hole]] = -1;
        const int64_t last = --a.count;
        if (hole != last) {
            std::copy(a.rows + last * a.width, a.rows + (last + 1) * a.width, a.rows + hole * a.width);
            a.ids[hole] = a.ids[last];
            a.entry_of[a.ids[hole]] = hole;
        }
    }
}

}  // namespace

// Add grads (n, 2, d) of fp32/bf16/fp16 to rows ids (n,) (unique) of the accumulator, skipping rows whose has_grad
// (n,) bool is false (has_grad empty: all rows). Slots are taken in the order of ids. Returns (count, finite).
std::tuple<int64_t, bool> accumulate_rows_(torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of,
                                           int64_t count, torch::Tensor ids, torch::Tensor grads,
                                           torch::Tensor has_grad, int64_t threads) {
    Accumulator a = accumulator_of(acc, acc_ids, entry_of, count);
    TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous() && ids.dim() == 1, "ids must be int64 1-D");
    const int64_t n = ids.size(0);
    TORCH_CHECK(grads.is_contiguous() && grads.numel() == n * a.width, "grads must be (n, 2, d) and contiguous");
    TORCH_CHECK(!has_grad.numel() || (has_grad.scalar_type() == torch::kBool && has_grad.numel() == n &&
                                      has_grad.is_contiguous()), "has_grad must be (n,) bool or empty");
    const int64_t* id = ids.data_ptr<int64_t>();
    const bool* has = has_grad.numel() ? has_grad.data_ptr<bool>() : nullptr;
    const int64_t first_new = a.count;
    std::vector<int64_t> entry(n, -1);
    for (int64_t i = 0; i < n; ++i) {
        if (!has || has[i]) entry[i] = entry_for(a, id[i]);
    }
    int64_t nonfinite = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, grads.scalar_type(), "accumulate_rows_", [&] {
        nonfinite = commit_rows(grads.data_ptr<scalar_t>(), entry.data(), n, a, first_new, threads);
    });
    return {a.count, nonfinite == 0};
}

// ---------------------------------------------------------------------------------------------------------------
// The sparse adapter on the CPU. x: (T, d) fp32; rows: (n, 2, d) fp32 (key, value of each fetched row);
// union_pos: (T, K) int64 positions in rows of each token's K picks; gate: (T, K) fp32 router logit of each pick's
// expert, or an empty tensor (ungated). Per token: pre_k = gate_k * (x . key_k), out = sum_k ReLU(pre_k) * value_k.


namespace {

constexpr int kGroup = 8;  // picks of a token worked on at once (8 independent sums, one load of x per 8 rows)

// One token's picks [k0, k0 + G): their scores (computed into sc, unless known: then sc holds them already), and
// out += ReLU(pre) * value. Inactive picks read a zero row instead of their value (so a non-finite value of a row
// inactive for this token cannot reach its output).
template <int G>
void forward_picks(const float* x, const float* r, const int64_t* pos, const float* g, const float* zeros,
                   int64_t dim, bool known, float* sc, float* o) {
    const float* keys[G];
    const float* values[G];
    float score[G], act[G];
    for (int j = 0; j < G; ++j) keys[j] = r + pos[j] * 2 * dim;
    if (known) {
        for (int j = 0; j < G; ++j) score[j] = sc[j];
    } else {
        meft::dots<G>(x, keys, dim, score);
        for (int j = 0; j < G; ++j) sc[j] = score[j];
    }
    for (int j = 0; j < G; ++j) {
        const float pre = g ? g[j] * score[j] : score[j];
        act[j] = pre > 0.0f ? pre : 0.0f;
        values[j] = pre > 0.0f ? keys[j] + dim : zeros;
    }
    meft::axpys<G>(act, values, o, dim);
}

}  // namespace

// known_scores: (T, K) fp32, each pick's x . key as routing computed it from the same x and keys (select_top_k's
// pick_scores: the same bits, see meft::dots), or empty to compute them here. Returns (out (T, d), scores (T, K) =
// x . key per pick, kept for backward: known_scores itself when given).
std::vector<torch::Tensor> sparse_adapter_forward(torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos,
                                                  torch::Tensor gate, torch::Tensor known_scores, int64_t threads) {
    check_adapter_inputs(x, rows, union_pos, gate);
    const int64_t tokens = x.size(0), dim = x.size(1), top_k = union_pos.size(1), n = rows.size(0);
    const bool known = known_scores.numel() > 0;
    if (known) {
        check_rows(known_scores, "known_scores");
        TORCH_CHECK(known_scores.sizes() == union_pos.sizes(), "known_scores must be (T, K) like union_pos");
    }
    auto out = torch::zeros_like(x);
    auto scores = known ? known_scores : torch::empty({tokens, top_k}, x.options());
    const float* xs = x.data_ptr<float>();
    const float* r = rows.data_ptr<float>();
    const int64_t* pos = union_pos.data_ptr<int64_t>();
    const float* g = gate.numel() ? gate.data_ptr<float>() : nullptr;
    float* o = out.data_ptr<float>();
    float* sc = scores.data_ptr<float>();
    for (int64_t e = 0; e < tokens * top_k; ++e) TORCH_CHECK(pos[e] >= 0 && pos[e] < n, "union_pos out of range");
    const std::vector<float> zeros(dim, 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) {
        int64_t k = 0;
        for (; k + kGroup <= top_k; k += kGroup) {
            const int64_t e = t * top_k + k;
            forward_picks<kGroup>(xs + t * dim, r, pos + e, g ? g + e : nullptr, zeros.data(), dim, known, sc + e,
                                  o + t * dim);
        }
        for (; k < top_k; ++k) {
            const int64_t e = t * top_k + k;
            forward_picks<1>(xs + t * dim, r, pos + e, g ? g + e : nullptr, zeros.data(), dim, known, sc + e, o + t * dim);
        }
    }
    return {out, scores};
}

namespace {

// One token's picks [e, e + G) (entries of union_pos) in backward: act, grad_score and the gate's gradient of each,
// and dx += grad_score * key. dout: the token's output gradient; live: whether it is not all zero.
template <int G>
void backward_picks(int64_t e, const float* dout, bool live, const float* r, const int64_t* pos, const float* g,
                    const float* sc, const float* zeros, int64_t dim, float* act, float* grad_score, float* dg,
                    float* dx) {
    const float* keys[G];
    const float* values[G];
    float grad_pre[G] = {}, scale[G];
    for (int j = 0; j < G; ++j) {
        keys[j] = r + pos[e + j] * 2 * dim;
        values[j] = keys[j] + dim;
    }
    if (live) meft::dots<G>(dout, values, dim, grad_pre);
    for (int j = 0; j < G; ++j) {
        const float pre = g ? g[e + j] * sc[e + j] : sc[e + j];
        if (!(pre > 0.0f)) grad_pre[j] = 0.0f;
        act[e + j] = pre > 0.0f ? pre : 0.0f;
        if (dg) dg[e + j] = grad_pre[j] * sc[e + j];
        grad_score[e + j] = scale[j] = g ? grad_pre[j] * g[e + j] : grad_pre[j];
        if (scale[j] == 0.0f) keys[j] = zeros;
    }
    meft::axpys<G>(scale, keys, dx, dim);
}

// Row u's gradient into scratch (2 * dim): grad_key = sum grad_score[e] x_t, grad_value = sum act[e] dout_t over its
// entries e (token t); sources and weights: a thread's space for a row's entries.
void row_gradient(const EntryGroups& by_row, int64_t u, int64_t top_k, const float* act, const float* grad_score,
                  const char* live, const float* xs, const float* dout, int64_t dim, float* scratch,
                  std::vector<const float*>& sources, std::vector<float>& weights) {
    for (const bool key : {true, false}) {
        sources.clear();
        weights.clear();
        for (int64_t q = by_row.start[u]; q < by_row.start[u + 1]; ++q) {
            const int64_t e = by_row.order[q], t = e / top_k;
            const float weight = key ? grad_score[e] : (live[t] ? act[e] : 0.0f);
            if (weight == 0.0f) continue;
            sources.push_back((key ? xs : dout) + t * dim);
            weights.push_back(weight);
        }
        meft::weighted_sum(sources.data(), weights.data(), static_cast<int64_t>(sources.size()), dim,
                           key ? scratch : scratch + dim);
    }
}

}  // namespace

// Returns (grad_x (T, d), grad_gate (T, K) or empty, count, finite). The gradient of fetched row u (id row_ids[u])
// goes straight into the accumulator (see accumulate_rows_), written once: each row's gradient is summed in a
// thread's scratch row (in cache), rounded to the precision rows travel in (round_to: 0 fp32, 1 bf16, 2 fp16, as the
// copy to the host would), then copied or added into its entry. Rows whose gradient is all zero (selected, but
// inactive for every token that chose them) take no entry.
std::tuple<torch::Tensor, torch::Tensor, int64_t, bool> sparse_adapter_backward(
    torch::Tensor grad_out, torch::Tensor x, torch::Tensor rows, torch::Tensor union_pos, torch::Tensor gate,
    torch::Tensor scores, torch::Tensor row_ids, torch::Tensor acc, torch::Tensor acc_ids, torch::Tensor entry_of,
    int64_t count, int64_t round_to, int64_t threads) {
    check_adapter_inputs(x, rows, union_pos, gate);
    check_rows(grad_out, "grad_out");
    Accumulator a = accumulator_of(acc, acc_ids, entry_of, count);
    const int64_t tokens = x.size(0), dim = x.size(1), top_k = union_pos.size(1), n = rows.size(0);
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
    const int64_t* pos = union_pos.data_ptr<int64_t>();
    const float* g = gate.numel() ? gate.data_ptr<float>() : nullptr;
    const float* sc = scores.data_ptr<float>();
    const int64_t* row_id = row_ids.data_ptr<int64_t>();
    float* dx = grad_x.data_ptr<float>();
    float* dg = gate.numel() ? grad_gate.data_ptr<float>() : nullptr;

    // token-parallel: d pre = (d out . value) on active picks; gate and x gradients
    const std::vector<float> zeros(dim, 0.0f);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tokens; ++t) {
        bool nonzero = false;
        for (int64_t c = 0; c < dim && !nonzero; ++c) nonzero = dout[t * dim + c] != 0.0f;
        live[t] = nonzero;
        int64_t k = 0;
        for (; k + kGroup <= top_k; k += kGroup) {
            backward_picks<kGroup>(t * top_k + k, dout + t * dim, nonzero, r, pos, g, sc, zeros.data(), dim, act.data(),
                                   grad_score.data(), dg, dx + t * dim);
        }
        for (; k < top_k; ++k) {
            backward_picks<1>(t * top_k + k, dout + t * dim, nonzero, r, pos, g, sc, zeros.data(), dim, act.data(),
                              grad_score.data(), dg, dx + t * dim);
        }
    }
    // entries for the rows that get a gradient, taken in the order of U (serially: the layout is deterministic)
    const EntryGroups by_row = group_entries(pos, entries, n);
    const int64_t first_new = a.count;
    std::vector<int64_t> target(n, -1);
    for (int64_t u = 0; u < n; ++u) {
        bool contributes = false;
        for (int64_t q = by_row.start[u]; q < by_row.start[u + 1] && !contributes; ++q) {
            const int64_t e = by_row.order[q];
            contributes = (act[e] > 0.0f && live[e / top_k]) || grad_score[e] != 0.0f;
        }
        if (contributes) target[u] = entry_for(a, row_id[u]);
    }
    // row-parallel over the entries of each row: d value_u, d key_u without races
    std::vector<char> came_out_zero(n, 0);
    int64_t nonfinite = 0;
#pragma omp parallel num_threads(threads) reduction(+ : nonfinite)
    {
        std::vector<float> scratch(2 * dim), weights;
        std::vector<const float*> sources;
#pragma omp for schedule(dynamic, 16)
        for (int64_t u = 0; u < n; ++u) {
            if (target[u] < 0) continue;
            row_gradient(by_row, u, top_k, act.data(), grad_score.data(), live.data(), xs, dout, dim, scratch.data(),
                         sources, weights);
            if (round_to == 1) {
                for (int64_t j = 0; j < 2 * dim; ++j) scratch[j] = static_cast<float>(c10::BFloat16(scratch[j]));
            } else if (round_to == 2) {
                for (int64_t j = 0; j < 2 * dim; ++j) scratch[j] = static_cast<float>(c10::Half(scratch[j]));
            }
            bool nonzero = false;
            for (int64_t j = 0; j < 2 * dim && !nonzero; ++j) nonzero = scratch[j] != 0.0f;
            if (!nonzero) {  // cancelled or underflowed to zero: not touched (an entry taken for it is given back)
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
    release_entries(a, released);
    return {grad_x, grad_gate, a.count, nonfinite == 0};
}
