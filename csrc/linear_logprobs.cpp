// CPU backend of dpo_kernels.linear_logprobs: forward and backward on compacted valid rows.
//
// The vocabulary is walked in chunks of Vc columns. For each chunk one GEMM (MKL, multi-threaded)
// gives the raw logits of every valid row against the chunk into a reused [Nv x Vc] fp32 buffer;
// one fused pass per row (at::parallel_for over rows, SIMD inside a row) applies the logit
// transform and folds the chunk into the row's online log-sum-exp and statistics (forward), or
// turns it in place into the logit gradient G (backward), which two more GEMMs turn into
// dW[chunk] = G^T H and dH += G W[chunk]. Memory beyond the gradients: the buffer, one fp32 chunk
// of the head, the fp32 rows H and the fp32 dH accumulator: O(Nv (Vc + D) + Vc D).
//
// bf16 and fp16 inputs are widened to fp32 one chunk at a time: fp32 accumulation everywhere,
// and on CPUs without bf16 matrix units fp32 GEMMs are also the fast ones.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) in fp32 without a library call, so the row loops vectorise: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6 polynomial for e^r (max relative error
// ~2e-7 on [-87, 88]). Inputs below -87.3 give ~1e-38 instead of 0: far below any sum they join.
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Options {
  double pre_scale;   // z = post_scale * tanh(pre_scale * x) with softcap, else pre_scale * x
  double post_scale;
  bool softcap;
};

// Raw logits x -> logits z, in place over one row of the chunk.
inline void transform_row(float* z, int64_t n, const Options& o) {
  const float pre = static_cast<float>(o.pre_scale);
  if (!o.softcap) {
    if (pre != 1.0f) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) z[j] *= pre;
    }
    return;
  }
  const float post = static_cast<float>(o.post_scale);
  for (int64_t j = 0; j < n; ++j) z[j] = post * std::tanh(pre * z[j]);
}

// One [Nv x Vc] chunk of raw logits: H (Nv x D, fp32) times W[c0:c0+vc]^T, plus the bias.
at::Tensor chunk_weight(const at::Tensor& weight, int64_t c0, int64_t vc) {
  at::Tensor w = weight.narrow(0, c0, vc);
  return w.scalar_type() == at::kFloat ? w.contiguous() : w.to(at::kFloat).contiguous();
}

void chunk_logits(const at::Tensor& h, const at::Tensor& w_c, const c10::optional<at::Tensor>& bias,
                  int64_t c0, at::Tensor& buf) {
  at::mm_out(buf, h, w_c.t());
  if (bias.has_value()) {
    buf.add_(bias->narrow(0, c0, w_c.size(0)).to(at::kFloat).unsqueeze(0));
  }
}

}  // namespace

// Rows per tile (the caller's tile_rows): a [rows x Vc] fp32 tile (512 KiB at 256 x 512) stays in
// a core's L2 between the GEMM that writes it and the pass that reads it.

// The row-state of the online log-sum-exp and statistics, one entry per compacted row; double
// across chunks so that 100k-entry vocabularies sum accurately.
struct RowState {
  std::vector<double> m, s, szx, s2, sumz;
  std::vector<float> target, zmax;
  explicit RowState(int64_t n)
      : m(n, -std::numeric_limits<double>::infinity()), s(n, 0.0), szx(n, 0.0), s2(n, 0.0),
        sumz(n, 0.0), target(n, std::numeric_limits<float>::quiet_NaN()),
        zmax(n, -std::numeric_limits<float>::infinity()) {}
};

// exp(z - m) for z up to m + kSlack stays finite in fp32 (e^40 squared, summed over a chunk, is
// still below 3.4e38), so a chunk whose maximum exceeds the running maximum by at most kSlack can
// be summed against the old maximum in one pass and rescaled afterwards.
constexpr float kSlack = 40.f;

// Sum one row's exp(z - ref) (with stats also e*z and e^2) and z, and take its maximum, in one
// vectorised pass. The plain sum of z also carries any NaN or infinity the vector max drops.
struct ChunkSums {
  float s = 0.f, szx = 0.f, s2 = 0.f, sz = 0.f, max = -std::numeric_limits<float>::infinity();
};

inline ChunkSums chunk_sums(const float* z, int64_t vc, float ref, bool with_stats) {
  float cs = 0.f, czx = 0.f, cs2 = 0.f, cz = 0.f;
  float cmax = -std::numeric_limits<float>::infinity();
  if (with_stats) {
#pragma omp simd reduction(+ : cs, czx, cs2, cz) reduction(max : cmax)
    for (int64_t j = 0; j < vc; ++j) {
      const float x = z[j];
      const float e = exp_f32(x - ref);
      cs += e;
      czx += e * x;
      cs2 += e * e;
      cz += x;
      cmax = std::max(cmax, x);
    }
  } else {
#pragma omp simd reduction(+ : cs, cz) reduction(max : cmax)
    for (int64_t j = 0; j < vc; ++j) {
      const float x = z[j];
      cs += exp_f32(x - ref);
      cz += x;
      cmax = std::max(cmax, x);
    }
  }
  ChunkSums c;
  c.s = cs;
  c.szx = czx;
  c.s2 = cs2;
  c.sz = cz;
  c.max = cmax;
  return c;
}

// Fold one row's chunk of logits z[0:vc] (columns c0..c0+vc of the vocabulary) into its state.
inline void fold_row(float* z, int64_t vc, int64_t c0, int64_t y, const Options& o, bool with_stats,
                     RowState& st, int64_t i) {
  transform_row(z, vc, o);
  if (y >= c0 && y < c0 + vc) st.target[i] = z[y - c0];
  // One pass against the running maximum; a second, against the chunk's own maximum, only when
  // the chunk's maximum is too far above it (always on a row's first chunk).
  const bool first = !(st.m[i] > -std::numeric_limits<double>::infinity());
  float ref = first ? 0.f : static_cast<float>(st.m[i]);
  ChunkSums c = chunk_sums(z, vc, ref, with_stats);
  if (!std::isfinite(c.sz)) {  // a NaN or infinite logit makes the row NaN, never a number
    st.m[i] = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  if (first || c.max > ref + kSlack) {
    ref = c.max;
    c = chunk_sums(z, vc, ref, with_stats);
  }
  st.zmax[i] = std::max(st.zmax[i], c.max);
  // Bring the row's sums and this chunk's to the larger of the two reference points.
  const double m_new = std::max(st.m[i], static_cast<double>(ref));
  const double a_old = first ? 0.0 : std::exp(st.m[i] - m_new);
  const double a_new = std::exp(static_cast<double>(ref) - m_new);
  st.s[i] = st.s[i] * a_old + c.s * a_new;
  st.szx[i] = st.szx[i] * a_old + c.szx * a_new;
  st.s2[i] = st.s2[i] * a_old * a_old + c.s2 * a_new * a_new;
  st.sumz[i] += c.sz;
  st.m[i] = m_new;
}

// Per-token results on the compacted rows: logp, lse, and with stats logits_mean, entropy,
// top1 (0/1), log_sum_sq_probs; all fp32 (Nv,). A label outside [0, V) gives logp = NaN.
std::vector<at::Tensor> forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                const c10::optional<at::Tensor>& bias_in,
                                const at::Tensor& labels_c, const at::Tensor& rows,
                                double pre_scale, double post_scale, bool softcap, bool with_stats,
                                int64_t chunk_v, int64_t kRows) {
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2, "hidden and weight must be 2-D");
  // Worker threads of at::parallel_for do not inherit the caller's autograd state: run on
  // detached tensors so no op here records (or refuses, for out= ops) a graph.
  at::NoGradGuard no_grad;
  const at::Tensor hidden = hidden_in.detach(), weight = weight_in.detach();
  const c10::optional<at::Tensor> bias =
      bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->detach()) : c10::nullopt;
  const Options o{pre_scale, post_scale, softcap};
  const int64_t nv = rows.size(0), vocab = weight.size(0);
  const int64_t vc_max = std::max<int64_t>(1, std::min(chunk_v, vocab));
  const int64_t n_blocks = (nv + kRows - 1) / kRows;
  at::Tensor h = hidden.index_select(0, rows).to(at::kFloat).contiguous();
  at::Tensor labels = labels_c.to(at::kLong).contiguous();
  auto f32 = hidden.options().dtype(at::kFloat);
  RowState st(nv);
  // One tile buffer per thread (rows x Vc), reused for every chunk.
  const int64_t n_threads = at::get_num_threads();
  at::Tensor tiles = at::empty({n_threads, std::min(kRows, nv), vc_max}, f32);
  const int64_t* lab = labels.data_ptr<int64_t>();

  for (int64_t c0 = 0; c0 < vocab; c0 += vc_max) {
    const int64_t vc = std::min(vc_max, vocab - c0);
    const at::Tensor w_c = chunk_weight(weight, c0, vc);
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;
      at::Tensor tile_all = tiles[at::get_thread_num()];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, r = std::min(kRows, nv - r0);
        at::Tensor z_t = tile_all.narrow(0, 0, r).narrow(1, 0, vc);
        chunk_logits(h.narrow(0, r0, r), w_c, bias, c0, z_t);
        float* zp = z_t.data_ptr<float>();
        const int64_t ld = z_t.stride(0);
        for (int64_t k = 0; k < r; ++k) {
          fold_row(zp + k * ld, vc, c0, lab[r0 + k], o, with_stats, st, r0 + k);
        }
      }
    });
  }

  std::vector<at::Tensor> out;
  at::Tensor logp = at::empty({nv}, f32), lse = at::empty({nv}, f32);
  float* lp = logp.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  for (int64_t i = 0; i < nv; ++i) {
    const double l = st.m[i] + std::log(st.s[i]);
    ls[i] = static_cast<float>(l);
    const bool ok = lab[i] >= 0 && lab[i] < vocab;
    lp[i] = ok ? static_cast<float>(static_cast<double>(st.target[i]) - l)
               : std::numeric_limits<float>::quiet_NaN();
  }
  out.push_back(logp);
  out.push_back(lse);
  if (with_stats) {
    at::Tensor mean = at::empty({nv}, f32), ent = at::empty({nv}, f32),
               top1 = at::empty({nv}, f32), lss = at::empty({nv}, f32);
    float *mp = mean.data_ptr<float>(), *ep = ent.data_ptr<float>(), *tp = top1.data_ptr<float>(),
          *sp = lss.data_ptr<float>();
    for (int64_t i = 0; i < nv; ++i) {
      const double l = st.m[i] + std::log(st.s[i]);
      mp[i] = static_cast<float>(st.sumz[i] / static_cast<double>(vocab));
      ep[i] = static_cast<float>(l - st.szx[i] / st.s[i]);
      tp[i] = st.target[i] >= st.zmax[i] ? 1.f : 0.f;
      sp[i] = static_cast<float>(std::log(st.s2[i]) - 2.0 * std::log(st.s[i]));
    }
    out.push_back(mean);
    out.push_back(ent);
    out.push_back(top1);
    out.push_back(lss);
  }
  return out;
}

// One row of logits z -> its logit gradient g * (onehot - softmax) * dz/dx, in place.
inline void grad_row(float* z, int64_t vc, int64_t c0, int64_t y, float lse, float g,
                     const Options& o) {
  const float pre = static_cast<float>(o.pre_scale), post = static_cast<float>(o.post_scale);
  transform_row(z, vc, o);
  const bool has_target = y >= c0 && y < c0 + vc;
  if (!o.softcap) {
    const float k = -g * pre;
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) z[j] = k * exp_f32(z[j] - lse);
    if (has_target) z[y - c0] += g * pre;
    return;
  }
  float tgt = 0.f;
  if (has_target) {
    const float t = z[y - c0] / post;
    tgt = g * (1.f - t * t) * pre * post;
  }
  const float k = -g * pre * post;
#pragma omp simd
  for (int64_t j = 0; j < vc; ++j) {
    const float t = z[j] / post;
    z[j] = k * exp_f32(z[j] - lse) * (1.f - t * t);
  }
  if (has_target) z[y - c0] += tgt;
}

// Gradients of sum_i grad_c[i] * logp_i: (dH (N x D, input dtype, zero on ignored rows) or an
// empty tensor, dW (V x D, weight dtype) or empty, db (V,) or empty).
std::vector<at::Tensor> backward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                 const c10::optional<at::Tensor>& bias_in,
                                 const at::Tensor& labels_c, const at::Tensor& rows,
                                 const at::Tensor& lse_c, const at::Tensor& grad_c,
                                 double pre_scale, double post_scale, bool softcap, bool need_h,
                                 bool need_w, bool need_b, int64_t chunk_v, int64_t kRows) {
  at::NoGradGuard no_grad;
  const at::Tensor hidden = hidden_in.detach(), weight = weight_in.detach();
  const c10::optional<at::Tensor> bias =
      bias_in.has_value() ? c10::optional<at::Tensor>(bias_in->detach()) : c10::nullopt;
  const Options o{pre_scale, post_scale, softcap};
  const int64_t nv = rows.size(0), vocab = weight.size(0), dim = weight.size(1);
  const int64_t vc_max = std::max<int64_t>(1, std::min(chunk_v, vocab));
  const int64_t n_blocks = (nv + kRows - 1) / kRows;
  at::Tensor h = hidden.index_select(0, rows).to(at::kFloat).contiguous();
  at::Tensor labels = labels_c.to(at::kLong).contiguous();
  at::Tensor lse = lse_c.to(at::kFloat).contiguous();
  at::Tensor g = grad_c.to(at::kFloat).contiguous();
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor dh_acc = need_h ? at::zeros({nv, dim}, f32) : at::Tensor();
  at::Tensor dw = need_w ? at::empty_like(weight) : at::empty({0}, weight.options());
  at::Tensor db = need_b ? at::empty({vocab}, bias->options()) : at::empty({0}, weight.options());
  // Per thread: a G tile, and partial dW / db of the chunk over the thread's row blocks, summed
  // in thread order after each chunk (the block-to-thread split is fixed by the thread count, so
  // results repeat bitwise from run to run).
  const int64_t n_threads = at::get_num_threads();
  at::Tensor tiles = at::empty({n_threads, std::min(kRows, nv), vc_max}, f32);
  at::Tensor dw_part = need_w ? at::empty({n_threads, vc_max, dim}, f32) : at::Tensor();
  at::Tensor db_part = need_b ? at::empty({n_threads, vc_max}, f32) : at::Tensor();
  std::vector<char> used(n_threads, 0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* lsp = lse.data_ptr<float>();
  const float* gp = g.data_ptr<float>();

  for (int64_t c0 = 0; c0 < vocab; c0 += vc_max) {
    const int64_t vc = std::min(vc_max, vocab - c0);
    const at::Tensor w_c = chunk_weight(weight, c0, vc);
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_worker;
      const int64_t t = at::get_thread_num();
      used[t] = 1;
      at::Tensor tile_all = tiles[t];
      at::Tensor dw_t = need_w ? dw_part[t].narrow(0, 0, vc) : at::Tensor();
      at::Tensor db_t = need_b ? db_part[t].narrow(0, 0, vc) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRows, r = std::min(kRows, nv - r0);
        at::Tensor z_t = tile_all.narrow(0, 0, r).narrow(1, 0, vc);
        const at::Tensor h_b = h.narrow(0, r0, r);
        chunk_logits(h_b, w_c, bias, c0, z_t);
        float* zp = z_t.data_ptr<float>();
        const int64_t ld = z_t.stride(0);
        for (int64_t k = 0; k < r; ++k) {
          const int64_t i = r0 + k;
          const int64_t y = std::min(std::max<int64_t>(lab[i], 0), vocab - 1);
          grad_row(zp + k * ld, vc, c0, y, lsp[i], gp[i], o);
        }
        if (need_h) dh_acc.narrow(0, r0, r).addmm_(z_t, w_c);  // this block's rows only
        if (need_w) {
          if (b == b0) at::mm_out(dw_t, z_t.t(), h_b);
          else dw_t.addmm_(z_t.t(), h_b);
        }
        if (need_b) {
          if (b == b0) at::sum_out(db_t, z_t, {0});
          else db_t.add_(z_t.sum(0));
        }
      }
    });
    at::Tensor dw_c, db_c;
    for (int64_t t = 0; t < n_threads; ++t) {
      if (!used[t]) continue;
      if (need_w) {
        at::Tensor p = dw_part[t].narrow(0, 0, vc);
        dw_c = dw_c.defined() ? dw_c.add_(p) : p;
      }
      if (need_b) {
        at::Tensor p = db_part[t].narrow(0, 0, vc);
        db_c = db_c.defined() ? db_c.add_(p) : p;
      }
    }
    if (need_w) dw.narrow(0, c0, vc).copy_(dw_c);
    if (need_b) db.narrow(0, c0, vc).copy_(db_c);
  }
  at::Tensor dh = at::empty({0}, hidden.options());
  if (need_h) {
    dh = at::zeros_like(hidden);
    dh.index_copy_(0, rows, dh_acc.to(hidden.scalar_type()));
  }
  return {dh, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpo_kernels CPU backend: fused linear log-probs (forward and backward)";
  m.def("forward", &forward, "per-token log-probs, lse and stats of the compacted rows");
  m.def("backward", &backward, "gradients of sum(grad_c * logp) w.r.t. hidden, weight, bias");
}
