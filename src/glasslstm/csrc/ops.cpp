// glasslstm's CPU kernels as PyTorch operators (torch.ops.glasslstm.*).
//
// The schemas and the CPU implementations are here; glasslstm/ops/library.py registers what
// torch.compile, torch.export, torch.func and autograd need on top (fake implementations,
// the derivative of lstm_layer, a vmap rule). Shapes: T steps, B rows, I input, H hidden,
// P = proj_size or H; gates in torch's order i, f, g, o.
//
//   lstm_layer           one layer, one direction, forward (see lstm_layer below)
//   lstm_layer_backward  its hand-derived backward through time
//   lstm_step            one token through L stacked layers, state in and out (drop-in call)
//   stream_step_         the same in place, into buffers kept between steps (Stream)
//   linear_              a language model's output layer for one token, in place
//   cell_forward_, cell_backward_   one step's pointwise math, in place (per-step loops, tests)
//   mm_bf16              bf16 x bf16 -> float32 product (the per-step bf16 cell)
//   mm                   a product by a named provider ("torch", "onednn")
//   gemm_probe           times a product by a provider (glasslstm.ops.gemm chooses by it)
//   isa, fp_mode         which kernels this CPU runs; the floating-point control word
//   loop_threads         how many threads a time loop splits its rows over
//   source_hash          the sources it was built from
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <string>
#include <tuple>
#include <vector>

#include "gemm.h"
#include "kernels.h"

namespace glasslstm {
namespace {

using at::Tensor;

template <typename T>
T *ptr(const Tensor &t) {
    return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
const T *cptr(const std::optional<Tensor> &t) {
    return t.has_value() && t->defined() && t->numel() ? t->data_ptr<T>() : nullptr;
}

void check_cpu_float(const Tensor &t, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "glasslstm: ", name, " must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "glasslstm: ", name, " must be float32 or float64, got ", t.scalar_type());
}

std::vector<int64_t> sizes_of(at::OptionalIntArrayRef batch_sizes, int64_t T, int64_t B) {
    std::vector<int64_t> v;
    if (!batch_sizes.has_value()) return v;
    v.assign(batch_sizes->begin(), batch_sizes->end());
    TORCH_CHECK((int64_t)v.size() == T, "glasslstm: batch_sizes has ", v.size(),
                " entries for ", T, " steps");
    for (size_t t = 0; t < v.size(); t++)
        TORCH_CHECK(v[t] >= 0 && v[t] <= B && (t == 0 || v[t] <= v[t - 1]),
                    "glasslstm: batch_sizes must be non-increasing values in 0..", B);
    return v;
}

// The shapes a layer's loop indexes by: a call with others (the operator called by hand) is
// refused here rather than read or written out of bounds.
void check_layer(const Tensor &x, const Tensor &h0, const Tensor &c0, const Tensor &w_ih,
                 const Tensor &w_hh, const std::optional<Tensor> &b_ih,
                 const std::optional<Tensor> &b_hh, const std::optional<Tensor> &w_hr) {
    TORCH_CHECK(x.dim() == 3, "glasslstm: x must be (T, B, I), got ", x.sizes());
    const bool proj = w_hr.has_value() && w_hr->defined();
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(0) > 0,
                "glasslstm: w_hh must be (4H, P), got ", w_hh.sizes());
    const int64_t B = x.size(1), I = x.size(2), H = w_hh.size(0) / 4, P = w_hh.size(1);
    auto same = [&](const Tensor &t, const char *name) {
        TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), "glasslstm: ",
                    name, " must be ", x.scalar_type(), " on the CPU like x, got ",
                    t.scalar_type(), " on ", t.device());
    };
    same(w_hh, "w_hh");
    same(w_ih, "w_ih");
    TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * H && w_ih.size(1) == I,
                "glasslstm: w_ih must be (4H, I) = (", 4 * H, ", ", I, "), got ", w_ih.sizes());
    TORCH_CHECK(proj || P == H, "glasslstm: w_hh is (4H, P) = ", w_hh.sizes(),
                " with P != H: give w_hr (P, H)");
    if (proj) {
        same(*w_hr, "w_hr");
        TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) == P && w_hr->size(1) == H,
                    "glasslstm: w_hr must be (P, H) = (", P, ", ", H, "), got ", w_hr->sizes());
    }
    same(h0, "h0");
    same(c0, "c0");
    TORCH_CHECK(h0.numel() == B * P && c0.numel() == B * H, "glasslstm: h0 and c0 must be (B, P) = (",
                B, ", ", P, ") and (B, H) = (", B, ", ", H, "), got ", h0.sizes(), " and ",
                c0.sizes());
    for (const auto *b : {&b_ih, &b_hh})
        if (b->has_value() && (*b)->defined()) {
            same(**b, "a bias");
            TORCH_CHECK((*b)->numel() == 4 * H, "glasslstm: a bias must have 4H = ", 4 * H,
                        " values, got ", (*b)->sizes());
        }
}

Tensor bias_of(const std::optional<Tensor> &b_ih, const std::optional<Tensor> &b_hh) {
    if (!b_ih.has_value() || !b_ih->defined()) return Tensor();
    return (b_hh.has_value() && b_hh->defined() ? b_ih->add(*b_hh) : *b_ih).contiguous();
}

Tensor empty0(const Tensor &like) { return at::empty({0}, like.options()); }

// ---- large buffers, reused ----------------------------------------------------------------------
// What a layer keeps for its backward and the backward's own buffers are tens of MB each, made
// and freed every training step. Taken from the system each time (glibc maps blocks this large
// anew), every 4 KiB page of them costs a page fault and its zeroing: 28 ms of a 245 ms
// layer-normalised training step at H = 512 on a 2-core Xeon. These buffers come instead from a
// cache of freed blocks, matched by exact size (a training loop asks for the same sizes every
// step), which holds at most $GLASSLSTM_BUFFER_CACHE_MB MiB of idle blocks (default 1024; 0:
// no cache). Only buffers that stay inside glasslstm (kept for the backward, the backward's own,
// inference's chunk of gates) come from it: a tensor made on such a block cannot be resized.
class BufferCache {
  public:
    static constexpr size_t kMinBytes = size_t(4) << 20;  // smaller ones: malloc reuses them

    static Tensor empty(at::IntArrayRef sizes, const at::TensorOptions &opts) {
        int64_t n = 1;
        for (int64_t d : sizes) n *= d;
        const size_t bytes = (size_t)n * opts.dtype().itemsize();
        BufferCache &c = get();
        if (bytes < kMinBytes || c.cap_ == 0) return at::empty(sizes, opts);
        void *p = c.take(bytes);
        if (!p) p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
        TORCH_CHECK(p, "glasslstm: out of memory allocating ", bytes, " bytes");
        return at::from_blob(p, sizes, [bytes](void *q) { get().give(q, bytes); }, opts);
    }

  private:
    std::mutex m_;
    std::unordered_multimap<size_t, void *> idle_;
    size_t held_ = 0, cap_;

    BufferCache() {
        const char *e = std::getenv("GLASSLSTM_BUFFER_CACHE_MB");
        cap_ = (e ? (size_t)std::strtoull(e, nullptr, 10) : size_t(1024)) << 20;
    }
    // never destroyed: tensors freed while the interpreter shuts down still hand their blocks
    // back to it
    static BufferCache &get() {
        static BufferCache *c = new BufferCache();
        return *c;
    }
    void *take(size_t bytes) {
        std::lock_guard<std::mutex> lock(m_);
        auto it = idle_.find(bytes);
        if (it == idle_.end()) return nullptr;
        void *p = it->second;
        idle_.erase(it);
        held_ -= bytes;
        return p;
    }
    void give(void *p, size_t bytes) {
        {
            std::lock_guard<std::mutex> lock(m_);
            if (held_ + bytes <= cap_) {
                idle_.emplace(bytes, p);
                held_ += bytes;
                return;
            }
        }
        std::free(p);
    }
};

Tensor buffer(at::IntArrayRef sizes, const at::TensorOptions &opts) {
    return BufferCache::empty(sizes, opts);
}
Tensor zeroed_buffer(at::IntArrayRef sizes, const at::TensorOptions &opts) {
    return BufferCache::empty(sizes, opts).zero_();
}

// ---- the regularised family (kernels.h: VariantArgs) ------------------------------------------
// The operators' optional arguments ln_ih, ln_hh, ln_c, ln_c_bias, peephole, zoneout_c,
// zoneout_h, h_mask, cell_clip, checked and laid out for the kernels. Zoneout masks may be any
// shape that broadcasts to (T, B, H) / (T, B, P) (a scalar z in evaluation: the expectation).
struct Variant {
    Tensor ln_ih, ln_hh, ln_c, ln_c_b, peep, zc, zh, hmask;
    double clip = 0;
    bool any() const {
        return ln_ih.defined() || ln_hh.defined() || ln_c.defined() || peep.defined() ||
               zc.defined() || zh.defined() || hmask.defined() || clip > 0;
    }
    bool ln() const { return ln_ih.defined() || ln_hh.defined() || ln_c.defined(); }
};

// aux's row: [x^ (4H) | r^ (4H) | c^ (H) | C~ before clipping (H) | 1/std x 3], each section
// only when used (glasslstm.ops.library.aux_width computes the same width)
struct AuxLayout {
    int64_t K = 0, o_xn = -1, o_rn = -1, o_cn = -1, o_cnew = -1, o_rstd = -1;
};
AuxLayout aux_layout(const Variant &v, int64_t H) {
    AuxLayout l;
    auto take = [&](bool used, int64_t n, int64_t &off) {
        if (used) off = l.K, l.K += n;
    };
    take(v.ln_ih.defined(), 4 * H, l.o_xn);
    take(v.ln_hh.defined(), 4 * H, l.o_rn);
    take(v.ln_c.defined(), H, l.o_cn);
    take(v.clip > 0 || v.zc.defined(), H, l.o_cnew);
    take(v.ln(), 3, l.o_rstd);
    return l;
}

Tensor opt(const std::optional<Tensor> &t) {
    return t.has_value() && t->defined() ? *t : Tensor();
}

Variant variant_of(const Tensor &x, int64_t Tn, int64_t B, int64_t H, int64_t P,
                   const std::optional<Tensor> &ln_ih, const std::optional<Tensor> &ln_hh,
                   const std::optional<Tensor> &ln_c, const std::optional<Tensor> &ln_c_bias,
                   const std::optional<Tensor> &peephole, const std::optional<Tensor> &zoneout_c,
                   const std::optional<Tensor> &zoneout_h, const std::optional<Tensor> &h_mask,
                   double cell_clip) {
    Variant v;
    auto vec = [&](const std::optional<Tensor> &t, int64_t n, const char *name) {
        Tensor u = opt(t);
        if (!u.defined()) return u;
        TORCH_CHECK(u.numel() == n && u.scalar_type() == x.scalar_type() && u.device().is_cpu(),
                    "glasslstm: ", name, " must hold ", n, " values of the input's dtype");
        return u.reshape({n}).contiguous();
    };
    auto mask = [&](const std::optional<Tensor> &t, std::vector<int64_t> shape, const char *name) {
        Tensor u = opt(t);
        if (!u.defined()) return u;
        TORCH_CHECK(u.scalar_type() == x.scalar_type() && u.device().is_cpu(), "glasslstm: ",
                    name, " must be of the input's dtype, on the CPU");
        return u.expand(shape).contiguous();
    };
    v.ln_ih = vec(ln_ih, 4 * H, "ln_ih");
    v.ln_hh = vec(ln_hh, 4 * H, "ln_hh");
    v.ln_c = vec(ln_c, H, "ln_c");
    v.ln_c_b = vec(ln_c_bias, H, "ln_c_bias");
    TORCH_CHECK(v.ln_c.defined() == v.ln_c_b.defined(),
                "glasslstm: ln_c and ln_c_bias go together");
    v.peep = vec(peephole, 3 * H, "peephole");
    v.zc = mask(zoneout_c, {Tn, B, H}, "zoneout_c");
    v.zh = mask(zoneout_h, {Tn, B, P}, "zoneout_h");
    v.hmask = mask(h_mask, {B, P}, "h_mask");
    TORCH_CHECK(cell_clip >= 0, "glasslstm: cell_clip must be >= 0 (0: no clipping)");
    v.clip = cell_clip;
    return v;
}

template <typename T>
VariantArgs<T> variant_args(const Variant &v, const AuxLayout &l, const Tensor &aux, bool ring) {
    VariantArgs<T> a{};
    a.ln_ih = ptr<T>(v.ln_ih), a.ln_hh = ptr<T>(v.ln_hh);
    a.ln_c = ptr<T>(v.ln_c), a.ln_c_b = ptr<T>(v.ln_c_b), a.peep = ptr<T>(v.peep);
    a.clip = (T)v.clip;
    a.zc = ptr<T>(v.zc), a.zh = ptr<T>(v.zh), a.hmask = ptr<T>(v.hmask);
    a.aux = l.K ? ptr<T>(aux) : nullptr, a.aux_ring = ring;
    a.K = l.K, a.o_xn = l.o_xn, a.o_rn = l.o_rn, a.o_cn = l.o_cn, a.o_cnew = l.o_cnew;
    a.o_rstd = l.o_rstd;
    return a;
}

// ---- lstm_layer -----------------------------------------------------------------------------
// (y, h_n, c_n, gates, cs, tanh_c, rs, aux): y (T, B, P) the outputs (zero past each row's end);
// h_n, c_n (B, P), (B, H) each row's final state; gates (T, B, 4H) the activated gates and cs
// (T, B, H) the cell states (zero past each row's end; both empty unless `train` or `record`);
// tanh_c and rs (T, B, H) tanh(C_t) and o tanh(C_t) before the projection, kept for the
// backward (empty unless `train`; rs also without a projection); aux (T, B, K) what the
// regularised family's backward needs (empty unless `train` and the family is used). Rows are
// sorted longest first when batch_sizes is given (the PackedSequence layout).
using Layer8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Inference projects its input in chunks of steps whose gates take about this many bytes
constexpr int64_t kChunkBytes = int64_t(8) << 20;

// x_t U^T for the steps [t0, t1) into the chunk buffer (ForwardArgs::project)
struct ProjectSteps {
    Tensor x2, u, buf;  // x (T B, I), U^T, the buffer (chunk B, 4H)
    Provider big;
    int64_t B;
    static void run(void *self, int64_t t0, int64_t t1) {
        auto &p = *static_cast<ProjectSteps *>(self);
        Tensor dst = p.buf.narrow(0, 0, (t1 - t0) * p.B);
        mm_into(p.big, p.x2.narrow(0, t0 * p.B, (t1 - t0) * p.B), p.u, 0.0, dst);
    }
};

template <typename T>
Layer8 layer_impl(
    const Tensor &x, const Tensor &h0_, const Tensor &c0_, const Tensor &w_ih, const Tensor &w_hh,
    const Tensor &bias, const std::optional<Tensor> &w_hr, const std::vector<int64_t> &sizes,
    bool reverse, bool train, bool record, bool bf16, Provider step, Provider big,
    const Variant &var) {
    const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(0) / 4,
                  P = w_hh.size(1);
    const bool ragged = !sizes.empty(), proj = w_hr.has_value() && w_hr->defined();
    const bool keep = train || record;
    auto opts = x.options();
    Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous();
    Tensor y = at::empty({Tn, B, P}, opts), h_n = at::empty({B, P}, opts),
           c_n = at::empty({B, H}, opts);
    // x U^T for all steps at once: one large product (the bias is added in the loop). In
    // inference, in chunks of steps instead, each projected just before the loop runs it, into
    // one buffer: for long sequences the gates of every step (4H values per row and step) would
    // be several times the output, and a fresh buffer that large costs a page fault per 4 KiB.
    Tensor x2 = x.reshape({Tn * B, I});
    Tensor gates;
    bf16 = bf16 && std::is_same<T, float>::value;
    const int64_t step_bytes = std::max<int64_t>(1, B * 4 * H * (int64_t)sizeof(T));
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / step_bytes);
    const bool chunked = !keep && !bf16 && Tn > chunk;
    ProjectSteps project;
    if (bf16) {
        gates = mm_bf16(x2, w_ih.t()).view({Tn, B, 4 * H});
    } else {
        const int64_t rows = (chunked ? chunk : Tn) * B;
        // a contiguous U^T pays for its copy on many rows (the BLAS's "T" product is slower)
        Tensor u = rows >= 64 ? transposed(w_ih) : w_ih.t();
        if (chunked) {
            gates = buffer({chunk, B, 4 * H}, opts);
            project = ProjectSteps{x2, u, gates.view({chunk * B, 4 * H}), big, B};
        } else {
            gates = buffer({Tn, B, 4 * H}, opts);
            Tensor g2 = gates.view({Tn * B, 4 * H});
            mm_into(big, x2, u, 0.0, g2);
        }
    }
    Tensor cs = keep ? buffer({Tn, B, H}, opts) : at::empty({2, B, H}, opts);
    Tensor tanh_c = train ? buffer({Tn, B, H}, opts) : empty0(x);
    Tensor rs;
    if (proj)  // zero-filled when ragged: the dW_hr product reads every row
        rs = train ? (ragged ? zeroed_buffer({Tn, B, H}, opts) : buffer({Tn, B, H}, opts))
                   : at::empty({1, B, H}, opts);
    // W^T (P, 4H), what every step multiplies by (and W_hr^T), unless the loop packs its own
    // copy straight from W
    Gemms g = gemms(step, bf16);
    const bool packs = std::is_same<T, float>::value && packs_weights(g, Tn, bf16);
    Tensor whh = w_hh.contiguous(), whr = proj ? w_hr->contiguous() : Tensor();
    Tensor w_t = packs ? Tensor() : transposed(whh);
    Tensor whr_t = proj && !packs ? transposed(whr) : Tensor();
    Tensor w_t16 = bf16 ? w_t.to(at::kBFloat16) : Tensor();
    ForwardArgs<T> a{};
    a.T_ = Tn, a.B = B, a.H = H, a.P = P;
    a.gates = ptr<T>(gates), a.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
    if (chunked) a.project = ProjectSteps::run, a.project_ctx = &project, a.chunk = chunk;
    a.h0 = ptr<T>(h0), a.c0 = ptr<T>(c0), a.y = ptr<T>(y);
    a.cs = ptr<T>(cs), a.cs_ring = !keep;
    a.tanh_c = train ? ptr<T>(tanh_c) : nullptr;
    a.rs = proj ? ptr<T>(rs) : nullptr, a.rs_ring = proj && !train;
    a.h_n = ptr<T>(h_n), a.c_n = ptr<T>(c_n);
    a.w = ptr<T>(whh), a.whr = proj ? ptr<T>(whr) : nullptr;
    a.w_t = packs ? nullptr : ptr<T>(w_t), a.whr_t = proj && !packs ? ptr<T>(whr_t) : nullptr;
    a.w_t16 = bf16 ? reinterpret_cast<const uint16_t *>(w_t16.data_ptr<at::BFloat16>()) : nullptr;
    a.batch_sizes = ragged ? sizes.data() : nullptr;
    a.reverse = reverse;
    const bool fam = var.any();
    const AuxLayout lay = aux_layout(var, H);
    Tensor aux = lay.K ? buffer({train ? Tn : 1, B, lay.K}, opts) : empty0(x);
    VariantArgs<T> va = variant_args<T>(var, lay, aux, !train);
    a.v = fam ? &va : nullptr;
    // rows that never run in this call (a stretch of a longer sequence: ended before it, or
    // starting after it) keep their state; the loop writes every other row's final state
    h_n.copy_(h0);
    c_n.copy_(c0);
    if (Tn > 0 && B > 0) {
        if constexpr (std::is_same<T, float>::value)
            kernels().forward_f32(a, g);
        else
            kernels().forward_f64(a, g);
    }
    return {y, h_n, c_n, keep ? gates : empty0(x), keep ? cs : empty0(x), tanh_c,
            proj && train ? rs : empty0(x), train ? aux : empty0(x)};
}

Layer8 lstm_layer(
    const Tensor &x, const Tensor &h0, const Tensor &c0, const Tensor &w_ih, const Tensor &w_hh,
    const std::optional<Tensor> &b_ih, const std::optional<Tensor> &b_hh,
    const std::optional<Tensor> &w_hr, at::OptionalIntArrayRef batch_sizes, bool reverse,
    bool train, bool record, bool bf16, c10::string_view step_gemm, c10::string_view big_gemm,
    const std::optional<Tensor> &ln_ih, const std::optional<Tensor> &ln_hh,
    const std::optional<Tensor> &ln_c, const std::optional<Tensor> &ln_c_bias,
    const std::optional<Tensor> &peephole, const std::optional<Tensor> &zoneout_c,
    const std::optional<Tensor> &zoneout_h, const std::optional<Tensor> &h_mask,
    double cell_clip) {
    check_cpu_float(x, "x");
    check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
    Tensor xc = x.contiguous();
    auto sizes = sizes_of(batch_sizes, x.size(0), x.size(1));
    Provider step = provider_of(std::string(step_gemm)), big = provider_of(std::string(big_gemm));
    Tensor bias = bias_of(b_ih, b_hh);
    Variant var = variant_of(x, x.size(0), x.size(1), w_hh.size(0) / 4, w_hh.size(1), ln_ih,
                             ln_hh, ln_c, ln_c_bias, peephole, zoneout_c, zoneout_h, h_mask,
                             cell_clip);
    if (x.scalar_type() == at::kFloat)
        return layer_impl<float>(xc, h0, c0, w_ih, w_hh, bias, w_hr, sizes, reverse, train,
                                 record, bf16, step, big, var);
    return layer_impl<double>(xc, h0, c0, w_ih, w_hh, bias, w_hr, sizes, reverse, train, record,
                              false, step, big, var);
}

// ---- lstm_layer_backward ----------------------------------------------------------------------
// Gradients (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr) (db: for b_ih and for b_hh alike); an
// entry whose output_mask is false comes back empty. Then those of the family's parameters
// (dln_ih, dln_hh, dln_c, dln_c_bias, dpeephole), empty where the parameter was not given.
using Grads12 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                           Tensor, Tensor, Tensor, Tensor>;

template <typename T>
Grads12 backward_impl(
    const std::optional<Tensor> &dy_, const std::optional<Tensor> &dh_n,
    const std::optional<Tensor> &dc_n, const Tensor &x, const Tensor &h0_, const Tensor &c0_,
    const Tensor &w_ih, const Tensor &w_hh, const std::optional<Tensor> &w_hr, const Tensor &y,
    const Tensor &gates, const Tensor &cs, const Tensor &tanh_c, const Tensor &rs,
    const std::vector<int64_t> &sizes, bool reverse, bool has_bias, std::array<bool, 7> mask,
    bool bf16, Provider step, Provider big, const Variant &var, const Tensor &aux) {
    const int64_t Tn = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(0) / 4,
                  P = w_hh.size(1);
    const bool ragged = !sizes.empty(), proj = w_hr.has_value() && w_hr->defined();
    auto opts = x.options();
    bf16 = bf16 && std::is_same<T, float>::value;
    Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous();
    Tensor dy = dy_.has_value() && dy_->defined() ? dy_->contiguous() : Tensor();
    Tensor da = ragged ? zeroed_buffer({Tn, B, 4 * H}, opts) : buffer({Tn, B, 4 * H}, opts);
    Tensor dhs = proj ? (ragged ? zeroed_buffer({Tn, B, P}, opts) : buffer({Tn, B, P}, opts))
                      : Tensor();
    Tensor dh = dh_n.has_value() && dh_n->defined() ? dh_n->clone(at::MemoryFormat::Contiguous)
                                                     : at::zeros({B, P}, opts);
    Tensor dc = dc_n.has_value() && dc_n->defined() ? dc_n->clone(at::MemoryFormat::Contiguous)
                                                     : at::zeros({B, H}, opts);
    Tensor db = has_bias && mask[5] ? at::empty({4 * H}, opts) : Tensor();
    Tensor w = w_hh.contiguous();
    Tensor whr = proj ? w_hr->contiguous() : Tensor();
    Tensor w16 = bf16 ? w.to(at::kBFloat16) : Tensor();
    BackwardArgs<T> a{};
    a.T_ = Tn, a.B = B, a.H = H, a.P = P;
    a.gates = ptr<T>(gates), a.cs = ptr<T>(cs), a.tanh_c = ptr<T>(tanh_c), a.c0 = ptr<T>(c0);
    a.dy = dy.defined() ? ptr<T>(dy) : nullptr;
    a.dh = ptr<T>(dh), a.dc = ptr<T>(dc), a.da = ptr<T>(da);
    a.dhs = proj ? ptr<T>(dhs) : nullptr;
    a.db = db.defined() ? ptr<T>(db) : nullptr;
    a.w = ptr<T>(w), a.whr = proj ? ptr<T>(whr) : nullptr;
    a.w16 = bf16 ? reinterpret_cast<const uint16_t *>(w16.data_ptr<at::BFloat16>()) : nullptr;
    a.batch_sizes = ragged ? sizes.data() : nullptr;
    a.reverse = reverse;
    const AuxLayout lay = aux_layout(var, H);
    TORCH_CHECK(aux.numel() == Tn * B * lay.K,
                "glasslstm: lstm_layer_backward needs the aux of a forward run with train=True "
                "and the same regularisation");
    Tensor auxc = aux.contiguous();
    VariantArgs<T> va = variant_args<T>(var, lay, auxc, false);
    const bool fam = var.any();
    a.v = fam ? &va : nullptr;
    // dL/d(H_{t-1} W^T) apart from da where da becomes dL/d(x U^T) (layer normalisation)
    Tensor dhw = var.ln_ih.defined() || var.ln_hh.defined()
                     ? (ragged ? zeroed_buffer({Tn, B, 4 * H}, opts) : buffer({Tn, B, 4 * H}, opts))
                     : Tensor();
    Tensor dv = fam && (var.ln() || var.peep.defined()) ? at::empty({13 * H}, opts) : Tensor();
    a.dhw = dhw.defined() ? ptr<T>(dhw) : nullptr;
    a.dv = dv.defined() ? ptr<T>(dv) : nullptr;
    if (Tn > 0 && B > 0) {
        Gemms g = gemms(step, bf16);
        if constexpr (std::is_same<T, float>::value)
            kernels().backward_f32(a, g);
        else
            kernels().backward_f64(a, g);
    } else {
        if (db.defined()) db.zero_();
        if (dv.defined()) dv.zero_();
    }
    // the weight and input gradients: one product each over all T B rows
    auto prod = [&](const Tensor &A, const Tensor &Bm) {
        return bf16 ? mm_bf16(A, Bm) : mm(big, A, Bm);
    };
    Tensor da2 = da.view({Tn * B, 4 * H});
    Tensor dx = mask[0] ? prod(da2, w_ih).view({Tn, B, I}) : empty0(x);
    Tensor dw_ih = mask[3] ? prod(da2.t(), x.reshape({Tn * B, I})) : empty0(x);
    Tensor dw_hh = empty0(x);
    if (mask[4]) {
        // sum over t of da_t^T H_{t-1}: H_{t-1} is y at the previous step (in the direction's
        // order) for the rows that continued from it, and h0 for the rows that started at t
        // (y is zero there: those rows were not active at the previous step). With recurrent
        // dropout the product read H_{t-1} m_h.
        dw_hh = at::zeros({4 * H, P}, opts);
        const Tensor &dr = dhw.defined() ? dhw : da;
        if (Tn > 1) {
            Tensor d_cont = reverse ? dr.narrow(0, 0, Tn - 1) : dr.narrow(0, 1, Tn - 1);
            Tensor h_prev = reverse ? y.narrow(0, 1, Tn - 1) : y.narrow(0, 0, Tn - 1);
            if (var.hmask.defined()) h_prev = h_prev.mul(var.hmask);
            if (bf16)
                dw_hh.add_(mm_bf16(d_cont.reshape({(Tn - 1) * B, 4 * H}).t(),
                                   h_prev.reshape({(Tn - 1) * B, P})));
            else
                mm_into(Provider::Torch, d_cont.reshape({(Tn - 1) * B, 4 * H}).t(),
                        h_prev.reshape({(Tn - 1) * B, P}), 1.0, dw_hh);
        }
        for (int64_t s = 0; s < Tn; s++) {  // the rows starting at each step (in its order)
            const int64_t t = reverse ? Tn - 1 - s : s;
            const int64_t now = ragged ? sizes[t] : B;
            const int64_t before = s == 0 ? 0 : (ragged ? sizes[reverse ? t + 1 : t - 1] : B);
            if (now <= before) continue;
            Tensor d_new = dr[t].narrow(0, before, now - before);
            Tensor h_new = h0.narrow(0, before, now - before);
            if (var.hmask.defined()) h_new = h_new.mul(var.hmask.narrow(0, before, now - before));
            if (bf16)
                dw_hh.add_(mm_bf16(d_new.t(), h_new));
            else
                mm_into(Provider::Torch, d_new.t(), h_new, 1.0, dw_hh);
        }
    }
    Tensor dw_hr = proj && mask[6] ? at::cpu::mm(dhs.view({Tn * B, P}).t(), rs.view({Tn * B, H}))
                                   : empty0(x);
    // dv: [g_ih (4H) | g_hh (4H) | p (3H) | g_c (H) | b_c (H)]
    auto part = [&](const Tensor &given, int64_t off, int64_t n) {
        return given.defined() ? dv.narrow(0, off, n).clone() : empty0(x);
    };
    return {dx, mask[1] ? dh : empty0(x), mask[2] ? dc : empty0(x), dw_ih, dw_hh,
            db.defined() ? db : empty0(x), dw_hr, part(var.ln_ih, 0, 4 * H),
            part(var.ln_hh, 4 * H, 4 * H), part(var.ln_c, 11 * H, H),
            part(var.ln_c_b, 12 * H, H), part(var.peep, 8 * H, 3 * H)};
}

Grads12 lstm_layer_backward(
    const std::optional<Tensor> &dy, const std::optional<Tensor> &dh_n,
    const std::optional<Tensor> &dc_n, const Tensor &x, const Tensor &h0, const Tensor &c0,
    const Tensor &w_ih, const Tensor &w_hh, const std::optional<Tensor> &w_hr, const Tensor &y,
    const Tensor &gates, const Tensor &cs, const Tensor &tanh_c, const Tensor &rs,
    at::OptionalIntArrayRef batch_sizes, bool reverse, bool has_bias,
    std::array<bool, 7> output_mask, bool bf16, c10::string_view step_gemm,
    c10::string_view big_gemm, const std::optional<Tensor> &aux,
    const std::optional<Tensor> &ln_ih, const std::optional<Tensor> &ln_hh,
    const std::optional<Tensor> &ln_c, const std::optional<Tensor> &ln_c_bias,
    const std::optional<Tensor> &peephole, const std::optional<Tensor> &zoneout_c,
    const std::optional<Tensor> &zoneout_h, const std::optional<Tensor> &h_mask,
    double cell_clip) {
    check_cpu_float(x, "x");
    TORCH_CHECK(tanh_c.numel() == cs.numel() && cs.numel() == x.size(0) * x.size(1) *
                                                                   (w_hh.size(0) / 4),
                "glasslstm: lstm_layer_backward needs the activations of a forward run with "
                "train=True");
    auto sizes = sizes_of(batch_sizes, x.size(0), x.size(1));
    Provider step = provider_of(std::string(step_gemm)), big = provider_of(std::string(big_gemm));
    Tensor xc = x.contiguous();
    Variant var = variant_of(x, x.size(0), x.size(1), w_hh.size(0) / 4, w_hh.size(1), ln_ih,
                             ln_hh, ln_c, ln_c_bias, peephole, zoneout_c, zoneout_h, h_mask,
                             cell_clip);
    Tensor aux_t = opt(aux).defined() ? *aux : empty0(x);
    if (x.scalar_type() == at::kFloat)
        return backward_impl<float>(dy, dh_n, dc_n, xc, h0, c0, w_ih, w_hh, w_hr, y, gates, cs,
                                    tanh_c, rs, sizes, reverse, has_bias, output_mask, bf16, step,
                                    big, var, aux_t);
    return backward_impl<double>(dy, dh_n, dc_n, xc, h0, c0, w_ih, w_hh, w_hr, y, gates, cs,
                                 tanh_c, rs, sizes, reverse, has_bias, output_mask, false, step,
                                 big, var, aux_t);
}

// ---- the one-token step ------------------------------------------------------------------------
// weights: one 1-D tensor holding, per layer, [U W] cut into blocks of kPanel rows, each its
// own contiguous (in + P, kPanel) matrix, then b_ih + b_hh (4H) and W_hr^T (H, P) where the
// layer has them (glasslstm.ops.step builds it). With weight-only int8, the panels are in
// weights8 (int8) instead, and weights holds one scale per panel row (4H rounded up to kPanel).
// layout: an int64 tensor of kLayout values per layer: the offsets of the panels (in weights or
// weights8), of the bias and of W_hr^T (in weights; -1: none), the layer's input size, and the
// offset of the int8 scales (in weights; -1: float panels). One tensor and one small table
// instead of lists: a step is a few microseconds, and a list of tensors costs more to pass.
constexpr int64_t kLayout = 5;

template <typename T>
void step_impl(const Tensor &x, bool x_is_proj, Tensor &h, Tensor &c, Tensor &out,
               const Tensor &weights, const Tensor &layout, Tensor &work, bool back,
               const std::optional<Tensor> &weights8) {
    const int64_t L = layout.numel() / kLayout, H = c.size(-1), P = h.size(-1);
    const int64_t *lay = layout.data_ptr<int64_t>();
    const T *w = weights.data_ptr<T>();
    const bool i8 = weights8.has_value() && weights8->defined();
    const int8_t *w8 = i8 ? weights8->data_ptr<int8_t>() : nullptr;
    constexpr int64_t kMaxLayers = 64;
    const T *pw[kMaxLayers], *bw[kMaxLayers], *hw[kMaxLayers];
    const int8_t *pw8[kMaxLayers];
    const float *sc[kMaxLayers];
    int64_t in_sizes[kMaxLayers];
    for (int64_t l = 0; l < L; l++) {
        const int64_t *e = lay + kLayout * l;
        pw[l] = i8 ? nullptr : w + e[0];
        pw8[l] = i8 ? w8 + e[0] : nullptr;
        bw[l] = e[1] >= 0 ? w + e[1] : nullptr;
        hw[l] = e[2] >= 0 ? w + e[2] : nullptr;
        in_sizes[l] = e[3];
        sc[l] = i8 ? reinterpret_cast<const float *>(w) + e[4] : nullptr;
    }
    StepArgs<T> s{};
    s.L = L, s.H = H, s.P = P, s.in_sizes = in_sizes;
    s.panels = i8 ? nullptr : pw, s.bias = bw, s.whr_t = hw;
    s.panels8 = i8 ? pw8 : nullptr, s.scales = i8 ? sc : nullptr;
    s.work = work.data_ptr<T>(), s.zigzag_back = back;
    s.x = x_is_proj ? nullptr : x.data_ptr<T>();
    s.xproj = x_is_proj ? x.data_ptr<T>() : nullptr;
    s.h = h.data_ptr<T>(), s.c = c.data_ptr<T>(), s.out = out.data_ptr<T>();
    if constexpr (std::is_same<T, float>::value)
        kernels().step_f32(s);
    else
        kernels().step_f64(s);
}

void check_step(const Tensor &x, const Tensor &h, const Tensor &c, const Tensor &work,
                const Tensor &weights, const Tensor &layout,
                const std::optional<Tensor> &weights8) {
    const int64_t L = layout.numel() / kLayout;
    TORCH_CHECK(layout.scalar_type() == at::kLong && layout.is_contiguous() &&
                    layout.numel() == kLayout * L && L >= 1 && L <= 64,
                "glasslstm: step layout must be ", kLayout,
                " int64 values per layer (1 to 64 layers)");
    for (const Tensor *t : {&x, &h, &c, &work, &weights}) {
        TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() &&
                        t->scalar_type() == x.scalar_type(),
                    "glasslstm: step buffers must be contiguous CPU tensors of one dtype");
    }
    const bool i8 = weights8.has_value() && weights8->defined();
    TORCH_CHECK(!i8 || (x.scalar_type() == at::kFloat && weights8->scalar_type() == at::kChar &&
                        weights8->is_contiguous() && weights8->device().is_cpu()),
                "glasslstm: int8 step weights go with float32 state, contiguous, on the CPU");
    const int64_t H = c.size(-1), P = h.size(-1), n = weights.numel();
    const int64_t n8 = i8 ? weights8->numel() : n;
    TORCH_CHECK(h.numel() == L * P && c.numel() == L * H && work.numel() >= step_work(H),
                "glasslstm: step state and work buffers have the wrong size");
    const int64_t *lay = layout.data_ptr<int64_t>();
    const int64_t rows = (4 * H + kPanel - 1) / kPanel * kPanel;
    for (int64_t l = 0; l < L; l++) {
        const int64_t *e = lay + kLayout * l;
        TORCH_CHECK(e[3] >= 1 && e[0] >= 0 && e[0] + rows * (e[3] + P) <= n8 &&
                        (e[1] < 0 || e[1] + 4 * H <= n) && (e[2] < 0 || e[2] + H * P <= n) &&
                        (!i8 || (e[4] >= 0 && e[4] + rows <= n)),
                    "glasslstm: step layout of layer ", l, " reaches outside the weights");
    }
}

void stream_step_(const Tensor &x, bool x_is_proj, Tensor h, Tensor c, Tensor out,
                  const Tensor &weights, const Tensor &layout, Tensor work, bool back,
                  const std::optional<Tensor> &weights8) {
    check_step(x, h, c, work, weights, layout, weights8);
    TORCH_CHECK(x.numel() == (x_is_proj ? 4 * c.size(-1) : layout.data_ptr<int64_t>()[3]),
                "glasslstm: step input has ", x.numel(), " values");
    if (x.scalar_type() == at::kFloat)
        step_impl<float>(x, x_is_proj, h, c, out, weights, layout, work, back, weights8);
    else
        step_impl<double>(x, x_is_proj, h, c, out, weights, layout, work, back, weights8);
}

// (output, h_n, c_n) of one token: x (1, 1, I) or (1, I); h0, c0 (L, 1, .) or (L, .) (None:
// zeros); shaped as torch.nn.LSTM returns them. The results are made with
// at::detail::empty_cpu (what torch.empty ends in, without a dispatch), and a contiguous state
// of the step's dtype is copied with memcpy: a step is short.
std::tuple<Tensor, Tensor, Tensor> lstm_step(const Tensor &x, const std::optional<Tensor> &h0,
                                             const std::optional<Tensor> &c0,
                                             const Tensor &weights, const Tensor &layout,
                                             bool back, int64_t hidden_size, int64_t out_size,
                                             const std::optional<Tensor> &weights8) {
    const int64_t L = layout.numel() / kLayout, H = hidden_size, P = out_size;
    const bool three = x.dim() == 3;
    const auto dt = x.scalar_type();
    using Sizes = std::vector<int64_t>;
    Tensor h = at::detail::empty_cpu(three ? Sizes{L, 1, P} : Sizes{L, P}, dt);
    Tensor c = at::detail::empty_cpu(three ? Sizes{L, 1, H} : Sizes{L, H}, dt);
    Tensor out = at::detail::empty_cpu(three ? Sizes{1, 1, P} : Sizes{1, P}, dt);
    Tensor work = at::detail::empty_cpu({step_work(H)}, dt);  // per call: never shared
    const bool given = h0.has_value() && h0->defined();
    TORCH_CHECK(given == (c0.has_value() && c0->defined()), "glasslstm: give both h0 and c0");
    for (auto [dst, src] : {std::pair<Tensor *, const std::optional<Tensor> *>{&h, &h0},
                            std::pair<Tensor *, const std::optional<Tensor> *>{&c, &c0}}) {
        if (!given)
            std::memset(dst->data_ptr(), 0, dst->nbytes());
        else if ((*src)->is_contiguous() && (*src)->scalar_type() == dt &&
                 (*src)->device().is_cpu() && (*src)->numel() == dst->numel())
            std::memcpy(dst->data_ptr(), (*src)->const_data_ptr(), dst->nbytes());
        else
            dst->copy_((*src)->reshape(dst->sizes()));
    }
    Tensor xc = x.is_contiguous() ? x : x.contiguous();
    check_step(xc, h, c, work, weights, layout, weights8);
    TORCH_CHECK(xc.numel() == layout.data_ptr<int64_t>()[3], "glasslstm: step input has ",
                xc.numel(), " values");
    if (dt == at::kFloat)
        step_impl<float>(xc, false, h, c, out, weights, layout, work, back, weights8);
    else
        step_impl<double>(xc, false, h, c, out, weights, layout, work, back, weights8);
    return {out, h, c};
}

void linear_(const Tensor &w_t, const std::optional<Tensor> &bias, const Tensor &v, Tensor out,
             const std::optional<Tensor> &scale) {
    TORCH_CHECK(w_t.is_contiguous() && v.is_contiguous() && out.is_contiguous() &&
                    w_t.dim() == 2 && w_t.size(0) == v.numel() && w_t.size(1) == out.numel(),
                "glasslstm: linear_ takes W^T (k, rows), v (k), out (rows), contiguous");
    if (w_t.scalar_type() == at::kChar) {  // weight-only int8: one scale per output row
        TORCH_CHECK(scale.has_value() && scale->numel() == out.numel() &&
                        out.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                    "glasslstm: an int8 linear_ needs float32 v and out and a scale per row");
        kernels().linear_i8(out.numel(), v.numel(), w_t.data_ptr<int8_t>(),
                            scale->data_ptr<float>(), cptr<float>(bias), v.data_ptr<float>(),
                            out.data_ptr<float>());
        return;
    }
    if (w_t.scalar_type() == at::kFloat)
        kernels().linear_f32(out.numel(), v.numel(), w_t.data_ptr<float>(), cptr<float>(bias),
                             v.data_ptr<float>(), out.data_ptr<float>());
    else
        kernels().linear_f64(out.numel(), v.numel(), w_t.data_ptr<double>(), cptr<double>(bias),
                             v.data_ptr<double>(), out.data_ptr<double>());
}

// one step's pointwise math in place (contract of glasslstm.ops.cells.Cell): a (n, >= 4H) rows
// of pre-activations -> activated gates; c = f c_prev + i g; tc = tanh(c); out = o tc
void cell_forward_(Tensor a, const Tensor &c_prev, Tensor c, Tensor tc, Tensor out) {
    const int64_t n = c.size(0), H = c.size(1);
    TORCH_CHECK(a.stride(1) == 1 && c_prev.stride(1) == 1 && c.stride(1) == 1 &&
                    tc.stride(1) == 1 && out.stride(1) == 1 && c.stride(0) == tc.stride(0),
                "glasslstm: cell_forward_ needs unit column strides (and c, tc alike)");
    if (a.scalar_type() == at::kFloat)
        kernels().cell_forward_f32(n, H, a.data_ptr<float>(), a.stride(0),
                                   c_prev.data_ptr<float>(), c_prev.stride(0),
                                   c.data_ptr<float>(), tc.data_ptr<float>(), c.stride(0),
                                   out.data_ptr<float>(), out.stride(0));
    else
        kernels().cell_forward_f64(n, H, a.data_ptr<double>(), a.stride(0),
                                   c_prev.data_ptr<double>(), c_prev.stride(0),
                                   c.data_ptr<double>(), tc.data_ptr<double>(), c.stride(0),
                                   out.data_ptr<double>(), out.stride(0));
}

// one step back in place: dh (n, H) the gradient reaching o tanh(c) (dy, when given, added
// to it); dc in: from later steps, out: dL/dc_prev; d: the pre-activation gradients
void cell_backward_(const Tensor &a, const Tensor &c_prev, const Tensor &tc, const Tensor &dh,
                    const std::optional<Tensor> &dy, Tensor dc, Tensor d) {
    const int64_t n = dc.size(0), H = dc.size(1);
    Tensor y = dy.has_value() && dy->defined() ? *dy : Tensor();
    TORCH_CHECK(!y.defined() || y.stride(0) == dh.stride(0),
                "glasslstm: cell_backward_ reads dh and dy with one row stride");
    TORCH_CHECK(d.stride(0) == a.stride(0), "glasslstm: d and a share their row stride");
    if (a.scalar_type() == at::kFloat)
        kernels().cell_backward_f32(n, H, a.data_ptr<float>(), a.stride(0),
                                    c_prev.data_ptr<float>(), c_prev.stride(0),
                                    tc.data_ptr<float>(), tc.stride(0), dh.data_ptr<float>(),
                                    y.defined() ? y.data_ptr<float>() : nullptr, dh.stride(0),
                                    dc.data_ptr<float>(), dc.stride(0), d.data_ptr<float>());
    else
        kernels().cell_backward_f64(n, H, a.data_ptr<double>(), a.stride(0),
                                    c_prev.data_ptr<double>(), c_prev.stride(0),
                                    tc.data_ptr<double>(), tc.stride(0), dh.data_ptr<double>(),
                                    y.defined() ? y.data_ptr<double>() : nullptr, dh.stride(0),
                                    dc.data_ptr<double>(), dc.stride(0), d.data_ptr<double>());
}

double gemm_probe_op(c10::string_view provider, int64_t m, int64_t n, int64_t k, int64_t reps,
                     int64_t threads) {
    return gemm_probe(std::string(provider), m, n, k, reps, threads);
}

std::string isa() { return kernels().isa; }
// (rows per panel, values of scratch) of the one-token step for this hidden size
std::vector<int64_t> step_sizes(int64_t H) { return {kPanel, step_work(H)}; }
int64_t loop_threads_op(int64_t B, int64_t weight_bytes) {
    return loop_threads(B, (size_t)weight_bytes);
}
// the hash of the sources this library was built from (glasslstm.ops.native rebuilds a stale one)
std::string source_hash() {
#ifdef GLASSLSTM_SOURCE_HASH
#define GL_STR2(x) #x
#define GL_STR(x) GL_STR2(x)
    return std::string(GL_STR(GLASSLSTM_SOURCE_HASH)).substr(1);  // "h<hash>": a token
#else
    return "";
#endif
}
int64_t fp_mode_op() { return (int64_t)fp_mode(); }

}  // namespace

TORCH_LIBRARY(glasslstm, m) {
    m.def(
        "lstm_layer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, Tensor? w_hr, int[]? batch_sizes, bool reverse, bool train, bool record, "
        "bool bf16, str step_gemm, str big_gemm, Tensor? ln_ih=None, Tensor? ln_hh=None, "
        "Tensor? ln_c=None, Tensor? ln_c_bias=None, Tensor? peephole=None, "
        "Tensor? zoneout_c=None, Tensor? zoneout_h=None, Tensor? h_mask=None, "
        "float cell_clip=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
    m.def(
        "lstm_layer_backward(Tensor? dy, Tensor? dh_n, Tensor? dc_n, Tensor x, Tensor h0, "
        "Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor y, Tensor gates, Tensor cs, "
        "Tensor tanh_c, Tensor rs, int[]? batch_sizes, bool reverse, bool has_bias, "
        "bool[7] output_mask, bool bf16, str step_gemm, str big_gemm, Tensor? aux=None, "
        "Tensor? ln_ih=None, Tensor? ln_hh=None, Tensor? ln_c=None, Tensor? ln_c_bias=None, "
        "Tensor? peephole=None, Tensor? zoneout_c=None, Tensor? zoneout_h=None, "
        "Tensor? h_mask=None, float cell_clip=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
    m.def(
        "lstm_step(Tensor x, Tensor? h0, Tensor? c0, Tensor weights, Tensor layout, bool back, "
        "int hidden_size, int out_size, Tensor? weights8=None) -> (Tensor, Tensor, Tensor)");
    m.def(
        "stream_step_(Tensor x, bool x_is_proj, Tensor(a!) h, Tensor(b!) c, Tensor(c!) out, "
        "Tensor weights, Tensor layout, Tensor(d!) work, bool back, Tensor? weights8=None) -> ()");
    m.def("linear_(Tensor w_t, Tensor? bias, Tensor v, Tensor(a!) out, Tensor? scale=None) -> ()");
    m.def("cell_forward_(Tensor(a!) a, Tensor c_prev, Tensor(b!) c, Tensor(c!) tc, "
          "Tensor(d!) out) -> ()");
    m.def("cell_backward_(Tensor a, Tensor c_prev, Tensor tc, Tensor dh, Tensor? dy, "
          "Tensor(a!) dc, Tensor(b!) d) -> ()");
    m.def("mm_bf16(Tensor a, Tensor b) -> Tensor");
    m.def("mm(Tensor a, Tensor b, str provider) -> Tensor");
    // no tensor arguments: catch-all kernels, registered with their schemas
    m.def("gemm_probe(str provider, int m, int n, int k, int reps, int threads) -> float",
          &gemm_probe_op);
    m.def("isa() -> str", &isa);
    m.def("loop_threads(int B, int weight_bytes) -> int", &loop_threads_op);
    m.def("step_sizes(int hidden_size) -> int[]", &step_sizes);
    m.def("fp_mode() -> int", &fp_mode_op);
    m.def("source_hash() -> str", &source_hash);
}

TORCH_LIBRARY_IMPL(glasslstm, CPU, m) {
    m.impl("lstm_layer", &lstm_layer);
    m.impl("lstm_layer_backward", &lstm_layer_backward);
    m.impl("lstm_step", &lstm_step);
    m.impl("stream_step_", &stream_step_);
    m.impl("linear_", &linear_);
    m.impl("cell_forward_", &cell_forward_);
    m.impl("cell_backward_", &cell_backward_);
    m.impl("mm_bf16", [](const Tensor &a, const Tensor &b) { return mm_bf16(a, b); });
    m.impl("mm", [](const Tensor &a, const Tensor &b, c10::string_view p) {
        return mm(provider_of(std::string(p)), a, b);
    });
}

}  // namespace glasslstm

// The module Python imports (glasslstm._C when installed, glasslstm_ops_<hash> when built on
// first use); the operators register themselves on load. It also holds what eager one-token
// calls use without the dispatcher's boxing (~8 us a call): the two steps as plain functions
// and DropIn; torch.compile, export and tracing see the operators.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

namespace glasslstm {
namespace py = pybind11;

// The drop-in call lstm(x_t, (h, c)) of one sequence, checked and run in C++: the step itself
// takes ~5-10 us, so the same checks written in Python would cost as much again.
// glasslstm.ops.step builds one per module and hands it the weights in the step's layout
// (set) with the parameters they were made from. A call returns (output, (h_n, c_n)); None
// where the call is not such a step (another shape or dtype, a tensor subclass or wrapper,
// a state it cannot take: the general path decides, errors included); NotImplemented where
// a parameter changed since set (replaced, updated in place, its .data swapped).
class DropIn {
  public:
    DropIn(std::vector<std::string> names, int64_t layers, int64_t hidden, int64_t out,
           int64_t input, at::ScalarType dtype)
        : L_(layers), H_(hidden), P_(out), I_(input), dtype_(dtype) {
        for (const auto &n : names) names_.push_back(py::str(n));
        held_.resize(names_.size());
        versions_.resize(names_.size());
        data_.resize(names_.size());
    }

    // the step's weights, and the parameters (in names' order) they were computed from
    void set(Tensor weights, Tensor layout, std::optional<Tensor> weights8,
             std::vector<Tensor> params) {
        TORCH_CHECK(params.size() == names_.size(), "glasslstm: DropIn.set takes ",
                    names_.size(), " parameters");
        TORCH_CHECK(layout.numel() == kLayout * L_, "glasslstm: DropIn.set: layout of ",
                    layout.numel(), " values for ", L_, " layers");
        for (size_t i = 0; i < params.size(); i++) {
            held_[i] = params[i];  // held: its TensorImpl cannot be reused by another tensor
            versions_[i] = params[i]._version();
            data_[i] = params[i].const_data_ptr();
        }
        weights_ = std::move(weights), layout_ = std::move(layout);
        weights8_ = std::move(weights8);
    }

    py::object call(py::handle params, py::handle x, py::handle hx) {
        if (torch::jit::tracer::isTracing() || !PyDict_Check(params.ptr())) return py::none();
        const Tensor *xt = plain(x.ptr());
        if (xt == nullptr || (xt->dim() != 3 && xt->dim() != 2)) return py::none();
        const bool three = xt->dim() == 3;
        if (xt->size(0) != 1 || (three && xt->size(1) != 1) || xt->size(-1) != I_)
            return py::none();
        const Tensor *h0 = nullptr, *c0 = nullptr;
        if (!hx.is_none()) {
            PyObject *s = hx.ptr();
            if (!(PyTuple_CheckExact(s) || PyList_CheckExact(s)) || PySequence_Fast_GET_SIZE(s) != 2)
                return py::none();
            h0 = plain(PySequence_Fast_GET_ITEM(s, 0));
            c0 = plain(PySequence_Fast_GET_ITEM(s, 1));
            if (h0 == nullptr || c0 == nullptr || !state_shape(*h0, three, P_) ||
                !state_shape(*c0, three, H_))
                return py::none();
        }
        const int held = holds(params.ptr());
        if (held < 0) return py::none();
        if (held == 0) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
        back_ = !back_;  // the zig-zag order of the panels, flipped by every step
        std::optional<Tensor> oh, oc;
        if (h0 != nullptr) oh = *h0, oc = *c0;
        auto [out, h, c] = lstm_step(*xt, oh, oc, weights_, layout_, back_, H_, P_, weights8_);
        return py::make_tuple(out, py::make_tuple(h, c));
    }

    // Whether the dict `params` (a module's _parameters) holds the tensors set was given,
    // unchanged: the same tensors, versions and memory. Stream's steps ask this instead of
    // comparing the same in Python (a few microseconds a step for a 2-layer model).
    bool same(py::handle params) const {
        return PyDict_Check(params.ptr()) && holds(params.ptr()) == 1;
    }

  private:
    // 1: `params` holds the parameters of the last set, unchanged; 0: one was replaced, updated
    // in place or had its .data swapped; -1: one is missing or not a tensor
    int holds(PyObject *params) const {
        for (size_t i = 0; i < names_.size(); i++) {
            PyObject *p = PyDict_GetItem(params, names_[i].ptr());  // borrowed
            if (p == nullptr || !THPVariable_Check(p)) return -1;
            const Tensor &t = THPVariable_Unpack(p);
            if (t.unsafeGetTensorImpl() != held_[i].unsafeGetTensorImpl() ||
                t._version() != versions_[i] || t.const_data_ptr() != data_[i])
                return 0;
        }
        return 1;
    }

    // the tensor of a torch.Tensor (not a subclass: those may mean something else) that the
    // step can read as is: strided, on the CPU, of the step's dtype, no wrapper (vmap, grad
    // transforms, functionalisation, a Python dispatch mode) around it
    const Tensor *plain(PyObject *o) const {
        if (!THPVariable_CheckExact(o)) return nullptr;
        const Tensor &t = THPVariable_Unpack(o);
        static const c10::DispatchKeySet usual = at::empty({0}).key_set();
        if (t.scalar_type() != dtype_ || !t.is_cpu() || t.layout() != at::kStrided ||
            (t.key_set() | usual) != usual)
            return nullptr;
        return &t;
    }
    bool state_shape(const Tensor &s, bool three, int64_t n) const {
        if (three) return s.dim() == 3 && s.size(0) == L_ && s.size(1) == 1 && s.size(2) == n;
        return s.dim() == 2 && s.size(0) == L_ && s.size(1) == n;
    }

    int64_t L_, H_, P_, I_;
    at::ScalarType dtype_;
    std::vector<py::object> names_;
    std::vector<Tensor> held_;
    std::vector<int64_t> versions_;
    std::vector<const void *> data_;
    Tensor weights_, layout_;
    std::optional<Tensor> weights8_;
    bool back_ = false;
};

}  // namespace glasslstm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("lstm_step", &glasslstm::lstm_step);
    m.def("stream_step_", &glasslstm::stream_step_);
    py::class_<glasslstm::DropIn>(m, "DropIn")
        .def(py::init<std::vector<std::string>, int64_t, int64_t, int64_t, int64_t, at::ScalarType>(),
             py::arg("names"), py::arg("layers"), py::arg("hidden"), py::arg("out"),
             py::arg("input"), py::arg("dtype"))
        .def("set", &glasslstm::DropIn::set)
        .def("same", &glasslstm::DropIn::same)
        .def("__call__", &glasslstm::DropIn::call);
}
