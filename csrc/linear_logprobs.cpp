// CPU backend of dpo_kernels.linear_logprobs: forward and backward on compacted valid rows.
//
// The vocabulary is walked in chunks of Vc columns; for each chunk, at::parallel_for hands row
// tiles to the threads. Each thread runs one single-threaded MKL GEMM per tile into its own
// L2-sized fp32 tile of raw logits, then one vectorised pass per row applies the logit transform
// and folds the chunk into the row's online log-sum-exp and statistics (forward), or turns it in
// place into the logit gradient G (backward), which two more GEMMs per tile turn into
// dH[tile] += G W[chunk] and the thread's partial dW[chunk] += G^T H[tile]. Memory beyond the
// gradients: the compacted fp32 rows H and dH accumulator, and per thread one tile and one
// [Vc x D] partial: O(Nv D + threads (tile + Vc D)). With keep (the loss-level path, which sizes
// the call to its memory budget) the forward's GEMMs write into an [Nv x V] buffer instead of the
// tiles, and the backward reads it there instead of recomputing: 4 Nv D V instead of 6.
//
// bf16 inputs on a CPU with bf16 units — AMX tiles, or AVX512-BF16 dot-product instructions —
// run bf16 GEMMs with fp32 accumulation and fp32 logits (the "native" path: oneDNN's brgemm
// through ATen's cpublas, which picks the unit). brgemm reads its second operand packed (VNNI,
// blocks of 64 columns), so the logits are computed transposed,
// Z^T = W[chunk] H[tile]^T: the head chunk is the first operand as it lies in memory and only the
// row tiles are packed, once per call; the tile is transposed back in L2 for the fold. The
// backward rounds G to bf16 for its two GEMMs (as the Triton backward stores it) and packs the
// head chunk once for dH += G W[chunk]. Elsewhere (and for odd D) bf16 and fp16 are widened to
// fp32 one chunk at a time (fp32 accumulation everywhere; on CPUs without bf16 units fp32 GEMMs
// are also the fast ones).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <cpuid.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) in fp32 without a library call, so the row loops vectorise: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, and Cephes' degree-6 polynomial for e^r (max relative error
// ~2e-7 on [-87, 88]). Inputs below -87.3 (and -inf: a masked lane) give exactly 0.
inline float exp_f32(float x) {
  const bool under = x < -87.3f;  // -inf included: exactly 0, so 0 * (x - m) can be skipped
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
  return under ? 0.f : p * scale;
}

// A new tensor backed by 2 MiB pages where the kernel allows it (transparent huge pages in
// "madvise" mode, the common default): the head's gradient (V x D, 2 GB for a
// Llama-3 head in fp32) and the kept logits are fresh memory at every call, and touching them
// first costs a page fault per 4 KiB (0.67 s for 2.1 GB on a 2-core VM, 0.20 s with huge pages).
// The advice covers the whole 2 MiB pages inside the buffer; untouched pages cost nothing.
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.numel() * t.element_size();
  const uintptr_t a = (begin + kHuge - 1) & ~(kHuge - 1), b = end & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // advice: may fail
#endif
  return t;
}

// ---- bf16 units: VNNI packing and blocked brgemm calls

namespace cpublas = at::native::cpublas;
using bf16_bits = uint16_t;

// brgemm's packed B is [K/2][N][2] (pairs of K interleaved) in blocks of kBlockN columns; K must
// be even and N one of 16..64, so K is padded to even and N to whole blocks, with zeros.
constexpr int64_t kBlockN = 64;
// The row tiles' packed blocks (the B of the logits GEMM) end in a narrower block, rounded to
// kNarrow columns, not to 64: 96 rows are 64 + 32 columns (no padding), not 128.
constexpr int64_t kNarrow = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Width of block j of a packed B with n columns: 64, the last one narrower (a multiple of 16).
inline int64_t block_width(int64_t n, int64_t j) {
  return std::min(kBlockN, round_up(n - j * kBlockN, kNarrow));
}

// B = X (K x N, row stride ld, bf16) packed: out [N/64 blocks][Kp/2][64][2].
void pack_rows(const bf16_bits* x, int64_t K, int64_t N, int64_t ld, bf16_bits* out) {
  const int64_t kp = round_up(K, 2), nb = round_up(N, kBlockN) / kBlockN;
  for (int64_t j = 0; j < nb; ++j) {
    bf16_bits* o = out + j * kp * kBlockN;
    const int64_t c0 = j * kBlockN, n = std::min(kBlockN, N - c0);
    for (int64_t k2 = 0; k2 < kp / 2; ++k2) {
      const bf16_bits* r0 = x + (2 * k2) * ld + c0;
      const bf16_bits* r1 = 2 * k2 + 1 < K ? r0 + ld : nullptr;
      bf16_bits* ok = o + k2 * kBlockN * 2;
      if (r1 != nullptr && n == kBlockN) {  // the common case: two whole rows, interleaved
#pragma omp simd
        for (int64_t c = 0; c < kBlockN; ++c) {
          ok[2 * c] = r0[c];
          ok[2 * c + 1] = r1[c];
        }
        continue;
      }
      for (int64_t c = 0; c < kBlockN; ++c) {
        ok[2 * c] = c < n ? r0[c] : 0;
        ok[2 * c + 1] = (c < n && r1 != nullptr) ? r1[c] : 0;
      }
    }
  }
}

// B = X^T where X is (N x K, row stride ld, bf16): the row tile as the logits GEMM's B, in
// blocks of 64 columns and a last narrower one (block_width; block j at j * Kp * 64). Each VNNI
// pair of K is two adjacent elements of a row of X, so for even K this is a transpose of 32-bit
// words, done in 16-word strips so that the output being written stays in L1.
void pack_transposed(const bf16_bits* x, int64_t N, int64_t K, int64_t ld, bf16_bits* out) {
  const int64_t kp = round_up(K, 2), k2n = kp / 2, nb = round_up(N, kBlockN) / kBlockN;
  std::memset(out, 0, sizeof(bf16_bits) * kp * round_up(N, kNarrow));
  const bool even = K % 2 == 0 && ld % 2 == 0;
  for (int64_t j = 0; j < nb; ++j) {
    bf16_bits* o = out + j * kp * kBlockN;
    const int64_t n = std::min(kBlockN, N - j * kBlockN), wj = block_width(N, j);
    const bf16_bits* xj = x + j * kBlockN * ld;
    if (even) {
      uint32_t* o32 = reinterpret_cast<uint32_t*>(o);
      for (int64_t s0 = 0; s0 < k2n; s0 += 16) {
        const int64_t s1 = std::min(k2n, s0 + 16);
        const int64_t len = s1 - s0;
        for (int64_t r = 0; r < n; ++r) {
          const uint32_t* src = reinterpret_cast<const uint32_t*>(xj + r * ld) + s0;
          uint32_t* dst = o32 + s0 * wj + r;
          if (len == 16) {
            for (int64_t q = 0; q < 16; ++q) dst[q * wj] = src[q];
          } else {
            for (int64_t q = 0; q < len; ++q) dst[q * wj] = src[q];
          }
        }
      }
      continue;
    }
    for (int64_t r = 0; r < n; ++r) {
      const bf16_bits* xr = xj + r * ld;
      for (int64_t k = 0; k < K; ++k) o[((k / 2) * wj + r) * 2 + k % 2] = xr[k];
    }
  }
}

// C (M x N, row stride ldc) (+)= A (M x Kp bf16, row stride lda) . packed B of N columns (blocks
// of 64 and a last narrower one, as pack_transposed and pack_rows lay them out).
inline void brgemm_blocks(int64_t M, int64_t kp, const bf16_bits* a, int64_t lda,
                          const bf16_bits* b, int64_t N, float* c, int64_t ldc, bool add) {
  for (int64_t j = 0; j * kBlockN < N; ++j) {
    const int64_t wj = block_width(N, j);
    cpublas::brgemm(M, wj, kp, lda, wj, ldc, add, reinterpret_cast<const at::BFloat16*>(a),
                    reinterpret_cast<const at::BFloat16*>(b + j * kp * kBlockN),
                    c + j * kBlockN, /*is_vnni=*/true);
  }
}

inline const bf16_bits* bits(const at::Tensor& t) {
  return reinterpret_cast<const bf16_bits*>(t.data_ptr<at::BFloat16>());
}
inline bf16_bits* mbits(at::Tensor& t) {
  return reinterpret_cast<bf16_bits*>(t.data_ptr<at::BFloat16>());
}

// What a worker thread of at::parallel_for must set itself, since thread-local state is not
// inherited: no autograd, and the caller's inference mode (under torch.inference_mode() the
// op's buffers are inference tensors, which may only be written in place inside it).
struct WorkerState {
  at::NoGradGuard no_grad;
  c10::InferenceMode inference;
  explicit WorkerState(bool enabled) : inference(enabled) {}
};

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

// What forward and backward share: the inputs, detached (worker threads of at::parallel_for do
// not inherit the caller's autograd state, so no op here may see a tensor that requires grad),
// the compacted fp32 rows, and how the work is cut: vocabulary chunks of vc_max columns, tiles of
// tile_rows rows. A [tile_rows x Vc] fp32 tile (512 KiB at 256 x 512) stays in a core's L2
// between the GEMM that writes it and the pass that reads it; each thread has one.
//
// On the native path h is the compacted rows in bf16, ht each row tile packed as the B of the
// transposed logits GEMM ([D x rows], rows in blocks of 64 and a narrower last one), zt a
// per-thread [vc_max x rq] fp32 tile for Z^T (rq = tile rows rounded up to a multiple of 16), and
// dq = D rounded up to whole blocks (the width of the dH and dW accumulators).
struct Problem {
  at::Tensor hidden, weight, h, labels, tiles;
  c10::optional<at::Tensor> bias;
  Options o;
  int64_t nv, vocab, dim, vc_max, tile_rows, n_blocks, n_threads;
  bool native;
  // Vocabulary split: the threads share out the vocabulary chunks instead of the row tiles, each
  // thread walking all rows for its chunks (few rows: every thread busy with tiles of all of them;
  // see split_vocab in cpu.py). Widening path only.
  bool split;
  int64_t rq, dq;
  at::Tensor ht, zt;
  // One chunk's converted head, reused by every chunk (a fresh multi-MB buffer per chunk costs a
  // page fault per 4 KiB when the allocator returns large blocks to the system): the fp32 copy on
  // the widening path (one per thread with the vocabulary split), the packed B of dH on the
  // native path. Untouched pages cost nothing.
  at::Tensor wbuf;
  // The loss-level path's kept logits: [Nv x V] fp32, written by the forward's GEMMs in place of
  // the per-thread tiles (the fold transforms them there, so they hold z), read by the backward
  // instead of a recompute. Undefined on the recompute path.
  at::Tensor kept;
};

Problem prepare(const at::Tensor& hidden, const at::Tensor& weight,
                const c10::optional<at::Tensor>& bias, const at::Tensor& labels_c,
                const at::Tensor& rows, double pre_scale, double post_scale, bool softcap,
                int64_t chunk_v, int64_t tile_rows, bool native, bool split) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden and weight must be 2-D");
  TORCH_CHECK(!(native && split), "the vocabulary split runs on the widening path only");
  TORCH_CHECK(!native || (hidden.scalar_type() == at::kBFloat16 && hidden.size(1) % 2 == 0),
              "the native path takes bfloat16 inputs with an even D (bf16_units() says whether "
              "this CPU has the units)");
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must be (V, D) with hidden's D");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "rows must be a 1-D int64 tensor of row indices");
  TORCH_CHECK(labels_c.dim() == 1 && labels_c.scalar_type() == at::kLong &&
                  labels_c.size(0) == rows.size(0),
              "labels_c must be a 1-D int64 tensor with one label per row");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == hidden.scalar_type()),
              "bias must be (V,) in hidden's dtype");
  TORCH_CHECK(tile_rows > 0 && chunk_v > 0, "tile_rows and chunk_v must be positive");
  Problem p;
  p.hidden = hidden.detach();
  p.weight = weight.detach();
  if (bias.has_value()) p.bias = bias->detach();
  p.o = Options{pre_scale, post_scale, softcap};
  p.nv = rows.size(0);
  p.vocab = weight.size(0);
  p.dim = weight.size(1);
  p.vc_max = std::max<int64_t>(1, std::min(chunk_v, p.vocab));
  p.tile_rows = tile_rows;
  p.n_blocks = (p.nv + tile_rows - 1) / tile_rows;
  p.n_threads = at::get_num_threads();
  p.native = native;
  p.split = split;
  const int64_t tr = std::min(tile_rows, p.nv);
  p.rq = native ? round_up(tr, kNarrow) : tr;
  p.dq = native ? round_up(p.dim, kBlockN) : p.dim;
  at::Tensor h = p.hidden.index_select(0, rows);  // checks rows' range
  const auto f32 = p.hidden.options().dtype(at::kFloat);
  if (native) {
    p.h = h.contiguous();
    p.ht = at::empty({p.n_blocks, p.dim * p.rq}, h.options());
    p.zt = at::empty({p.n_threads, p.vc_max, p.rq}, f32);
    at::parallel_for(0, p.n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * tile_rows, r = std::min(tile_rows, p.nv - r0);
        at::Tensor out = p.ht[b];
        pack_transposed(bits(p.h) + r0 * p.dim, r, p.dim, p.dim, mbits(out));
      }
    });
  } else {
    p.h = h.to(at::kFloat).contiguous();
  }
  p.labels = labels_c.contiguous();
  p.tiles = at::empty({p.n_threads, tr, p.vc_max}, f32);
  if (native) {
    p.wbuf = at::empty({p.dq * round_up(p.vc_max, 2)}, p.weight.options());
  } else if (p.weight.scalar_type() != at::kFloat) {
    p.wbuf = at::empty({split ? p.n_threads : 1, p.vc_max, p.dim}, f32);
  }
  return p;
}

// Columns c0..c0+vc of the head (and bias), converted once per chunk: w in fp32, or on the native
// path (backward only) wk, W[chunk] packed as the B of dH += G W[chunk] (K = vc).
struct Chunk {
  int64_t c0, vc;
  at::Tensor w, b;  // b undefined without bias
  at::Tensor wk;
};

Chunk chunk_at(const Problem& p, int64_t c0, bool for_backward, int64_t t = 0) {
  Chunk c{c0, std::min(p.vc_max, p.vocab - c0), {}, {}, {}};
  at::Tensor w = p.weight.narrow(0, c0, c.vc);
  if (p.bias.has_value()) c.b = p.bias->narrow(0, c0, c.vc).to(at::kFloat).unsqueeze(0);
  if (!p.native) {
    if (w.scalar_type() == at::kFloat) {
      c.w = w.contiguous();
    } else {
      c.w = p.wbuf[p.split ? t : 0].narrow(0, 0, c.vc);
      c.w.copy_(w);
    }
    return c;
  }
  c.w = w;  // the first operand of Z^T = W[chunk] H^T, read as it lies (weight is contiguous)
  if (!for_backward) return c;
  const int64_t nbd = p.dq / kBlockN, kv = round_up(c.vc, 2);
  c.wk = p.wbuf.narrow(0, 0, nbd * kv * kBlockN);
  const bf16_bits* src = bits(w);
  bf16_bits* wk = mbits(c.wk);
  at::parallel_for(0, nbd, 1, [&](int64_t j0, int64_t j1) {  // 64-column blocks: independent
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = std::min(kBlockN, p.dim - j * kBlockN);
      pack_rows(src + j * kBlockN, c.vc, n, p.dim, wk + j * kv * kBlockN);
    }
  });
  return c;
}

// Block b's rows r0..r0+r of the chunk in the kept logits (row stride V).
at::Tensor kept_tile(const Problem& p, const Chunk& c, int64_t r0, int64_t r) {
  return p.kept.narrow(0, r0, r).narrow(1, c.c0, c.vc);
}

// Thread t's tile of raw logits for block b (rows r0..r0+r): H[rows] W[chunk]^T + b[chunk]; in
// the kept logits where the call keeps them, else in the thread's L2-sized tile.
at::Tensor tile_logits(const Problem& p, const Chunk& c, int64_t t, int64_t b, int64_t r0,
                       int64_t r) {
  at::Tensor z = p.kept.defined() ? kept_tile(p, c, r0, r)
                                  : p.tiles[t].narrow(0, 0, r).narrow(1, 0, c.vc);
  if (p.native) {
    at::Tensor zt = p.zt[t];
    brgemm_blocks(c.vc, p.dim, bits(c.w), p.dim, bits(p.ht[b]), round_up(r, kNarrow),
                  zt.data_ptr<float>(), p.rq, false);
    z.copy_(zt.narrow(0, 0, c.vc).narrow(1, 0, r).t());
  } else {
    at::mm_out(z, p.h.narrow(0, r0, r), c.w.t());
  }
  if (c.b.defined()) z.add_(c.b);
  return z;
}

// The row-state of the online log-sum-exp and statistics, one entry per compacted row; double
// across chunks so that 100k-entry vocabularies sum accurately. Against the running maximum m:
// s = sum e^(z-m), t = sum e^(z-m) (z-m) (so the entropy is log s - t/s, with no cancellation of
// huge logits), s2 = sum e^(2(z-m)); sumz = sum z / V (each term scaled first, so the sum of
// logits near the float limit cannot overflow). A -inf logit (a masked vocabulary lane) adds
// nothing to any of them but sumz (which becomes -inf, the mean's limit).
struct RowState {
  std::vector<double> m, s, t, s2, sumz;
  std::vector<float> target, zmax;
  float inv_vocab;
  RowState(int64_t n, float inv_v)
      : m(n, -std::numeric_limits<double>::infinity()), s(n, 0.0), t(n, 0.0), s2(n, 0.0),
        sumz(n, 0.0), target(n, std::numeric_limits<float>::quiet_NaN()),
        zmax(n, -std::numeric_limits<float>::infinity()), inv_vocab(inv_v) {}
};

// exp(z - m) for z up to m + kSlack stays finite in fp32 (e^40 squared, summed over a chunk, is
// still below 3.4e38), so a chunk whose maximum exceeds the running maximum by at most kSlack can
// be summed against the old maximum in one pass and rescaled afterwards.
constexpr float kSlack = 40.f;

// One row's chunk against a reference point ref, in one vectorised pass: s = sum e^(z-ref),
// with stats t = sum e^(z-ref) (z-ref) (a zero e adds nothing, also where z - ref is -inf),
// s2 = sum e^(2(z-ref)) and sz = sum z / V; its maximum; bad = how many logits are NaN or +inf
// (the vector max drops NaN, so they are counted apart).
struct ChunkSums {
  float s = 0.f, t = 0.f, s2 = 0.f, sz = 0.f, bad = 0.f;
  float max = -std::numeric_limits<float>::infinity();
};

inline ChunkSums chunk_sums(const float* z, int64_t vc, float ref, bool with_stats, float inv_v) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float cs = 0.f, ct = 0.f, cs2 = 0.f, cz = 0.f, cbad = 0.f;
  float cmax = -inf;
  if (with_stats) {
#pragma omp simd reduction(+ : cs, ct, cs2, cz, cbad) reduction(max : cmax)
    for (int64_t j = 0; j < vc; ++j) {
      const float x = z[j];
      const float d = x - ref;
      const float e = exp_f32(d);
      cs += e;
      ct += e > 0.f ? e * d : 0.f;
      cs2 += e * e;
      cz += x * inv_v;
      cmax = std::max(cmax, x);
      cbad += (x != x || x == inf) ? 1.f : 0.f;
    }
  } else {
#pragma omp simd reduction(+ : cs, cbad) reduction(max : cmax)
    for (int64_t j = 0; j < vc; ++j) {
      const float x = z[j];
      cs += exp_f32(x - ref);
      cmax = std::max(cmax, x);
      cbad += (x != x || x == inf) ? 1.f : 0.f;
    }
  }
  ChunkSums c;
  c.s = cs;
  c.t = ct;
  c.s2 = cs2;
  c.sz = cz;
  c.bad = cbad;
  c.max = cmax;
  return c;
}

// Brings sums (s, t, s2) taken against m to the reference m_new >= m: factor a = e^(m - m_new),
// and t gains (m - m_new) s. Sums of nothing (m = -inf) stay zero.
inline void rebase(double m, double m_new, double& s, double& t, double& s2) {
  if (!(m > -std::numeric_limits<double>::infinity())) {
    s = t = s2 = 0.0;
    return;
  }
  const double a = std::exp(m - m_new);
  t = a > 0.0 ? a * (t + (m - m_new) * s) : 0.0;  // not 0 * inf when the old sums vanish
  s *= a;
  s2 *= a * a;
}

// Fold one row's chunk of logits z[0:vc] (columns c0..c0+vc of the vocabulary) into its state.
inline void fold_row(float* z, int64_t vc, int64_t c0, int64_t y, const Options& o, bool with_stats,
                     RowState& st, int64_t i) {
  transform_row(z, vc, o);
  if (y >= c0 && y < c0 + vc) st.target[i] = z[y - c0];
  if (std::isnan(st.m[i])) {  // a NaN row stays NaN; its mean and max logit see every lane
    float cz = 0.f, cmax = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(+ : cz) reduction(max : cmax)
    for (int64_t j = 0; j < vc; ++j) {
      cz += z[j] * st.inv_vocab;
      cmax = std::max(cmax, z[j]);
    }
    if (with_stats) st.sumz[i] += cz;
    st.zmax[i] = std::max(st.zmax[i], cmax);
    return;
  }
  // One pass against the running maximum; a second, against the chunk's own maximum, only when
  // the chunk's maximum is too far above it (always on a row's first chunk).
  const bool first = !(st.m[i] > -std::numeric_limits<double>::infinity());
  float ref = first ? 0.f : static_cast<float>(st.m[i]);
  ChunkSums c = chunk_sums(z, vc, ref, with_stats, st.inv_vocab);
  if (with_stats) st.sumz[i] += c.sz;  // +inf or NaN with such a logit, as the mean is
  if (c.bad > 0.f) {  // a NaN or +inf logit makes the row NaN, never a number
    st.m[i] = std::numeric_limits<double>::quiet_NaN();
    st.zmax[i] = std::max(st.zmax[i], c.max);  // +inf where one is (for top1_correct)
    return;
  }
  if (!(c.max > -std::numeric_limits<float>::infinity())) return;  // all -inf: adds nothing
  if (first || c.max > ref + kSlack) {
    ref = c.max;
    c = chunk_sums(z, vc, ref, with_stats, st.inv_vocab);
  }
  st.zmax[i] = std::max(st.zmax[i], c.max);
  const double m_new = std::max(st.m[i], static_cast<double>(ref));
  rebase(st.m[i], m_new, st.s[i], st.t[i], st.s2[i]);
  double cs = c.s, ct = c.t, cs2 = c.s2;
  rebase(ref, m_new, cs, ct, cs2);
  st.s[i] += cs;
  st.t[i] += ct;
  st.s2[i] += cs2;
  st.m[i] = m_new;
}

// Fold the row-states of another share of the vocabulary into st (same rows): the sums brought to
// the larger reference point, as fold_row does for one chunk; a NaN row stays NaN.
void merge_rows(RowState& st, const RowState& o) {
  const double ninf = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < st.m.size(); ++i) {
    if (std::isnan(st.m[i]) || std::isnan(o.m[i])) {
      st.m[i] = std::numeric_limits<double>::quiet_NaN();
    } else if (o.m[i] > ninf) {  // else o saw no finite logit of this row: nothing to add
      const double m_new = std::max(st.m[i], o.m[i]);
      rebase(st.m[i], m_new, st.s[i], st.t[i], st.s2[i]);
      double os = o.s[i], ot = o.t[i], os2 = o.s2[i];
      rebase(o.m[i], m_new, os, ot, os2);
      st.s[i] += os;
      st.t[i] += ot;
      st.s2[i] += os2;
      st.m[i] = m_new;
    }
    st.sumz[i] += o.sumz[i];
    if (!std::isnan(o.target[i])) st.target[i] = o.target[i];
    st.zmax[i] = std::max(st.zmax[i], o.zmax[i]);
  }
}

// One row of raw logits (or, if transformed, of logits z) -> its logit gradient
// g * (onehot - softmax) * dz/dx, in place.
// p = exp((z - m) - log_s) in that order: as accurate as log_softmax, where one rounded
// lse = m + log_s would carry u |lse| into every p (see backend.TokenResult).
inline void grad_row(float* z, int64_t vc, int64_t c0, int64_t y, float m, float log_s, float g,
                     const Options& o, bool transformed) {
  const float pre = static_cast<float>(o.pre_scale), post = static_cast<float>(o.post_scale);
  if (!transformed) transform_row(z, vc, o);
  const bool has_target = y >= c0 && y < c0 + vc;
  if (!o.softcap) {
    const float k = -g * pre;
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) z[j] = k * exp_f32((z[j] - m) - log_s);
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
    z[j] = k * exp_f32((z[j] - m) - log_s) * (1.f - t * t);
  }
  if (has_target) z[y - c0] += tgt;
}

}  // namespace

// Per-token results on the compacted rows, in the order of the fields of dpo_kernels'
// backend.TokenResult: logps, max_logit, log_s, and with stats logits_sum (the vocab-mean logit),
// entropy_sum, top1_correct (0/1), log_sum_sq_probs_sum; all fp32 (Nv,). A label outside
// [0, V) gives logps = NaN. With keep, one more: the logits z of every row, [Nv x V] fp32, for
// the backward to read instead of recomputing them (the loss-level path).
std::vector<at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, const at::Tensor& labels_c,
                                const at::Tensor& rows, double pre_scale, double post_scale,
                                bool softcap, bool with_stats, int64_t chunk_v,
                                int64_t tile_rows, bool native, bool split_vocab, bool keep) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::NoGradGuard no_grad;
  Problem p = prepare(hidden, weight, bias, labels_c, rows, pre_scale, post_scale, softcap,
                      chunk_v, tile_rows, native, split_vocab);
  const int64_t nv = p.nv, vocab = p.vocab;
  if (keep) p.kept = empty_huge({nv, vocab}, p.hidden.options().dtype(at::kFloat));
  const int64_t* lab = p.labels.data_ptr<int64_t>();
  const float inv_v = 1.f / static_cast<float>(vocab);
  RowState st(nv, inv_v);

  if (p.split) {
    // Each thread folds its share of the chunks, over all rows, into its own row-states, which
    // are then merged in thread order (the chunk-to-thread split is fixed by the thread count).
    const int64_t n_chunks = (vocab + p.vc_max - 1) / p.vc_max;
    std::vector<RowState> part(p.n_threads, RowState(nv, inv_v));
    std::vector<char> used(p.n_threads, 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t k0, int64_t k1) {
      const WorkerState worker(inference);
      const int64_t t = at::get_thread_num();
      used[t] = 1;
      for (int64_t k = k0; k < k1; ++k) {
        const Chunk c = chunk_at(p, k * p.vc_max, /*for_backward=*/false, t);
        for (int64_t b = 0; b < p.n_blocks; ++b) {
          const int64_t r0 = b * p.tile_rows, r = std::min(p.tile_rows, nv - r0);
          at::Tensor z = tile_logits(p, c, t, b, r0, r);
          float* zp = z.data_ptr<float>();
          for (int64_t i = 0; i < r; ++i) {
            fold_row(zp + i * z.stride(0), c.vc, c.c0, lab[r0 + i], p.o, with_stats, part[t],
                     r0 + i);
          }
        }
      }
    });
    for (int64_t t = 0; t < p.n_threads; ++t) {
      if (used[t]) merge_rows(st, part[t]);
    }
  }
  for (int64_t c0 = 0; c0 < vocab && !p.split; c0 += p.vc_max) {
    const Chunk c = chunk_at(p, c0, /*for_backward=*/false);
    at::parallel_for(0, p.n_blocks, 1, [&](int64_t b0, int64_t b1) {
      const WorkerState worker(inference);
      const int64_t t = at::get_thread_num();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * p.tile_rows, r = std::min(p.tile_rows, nv - r0);
        at::Tensor z = tile_logits(p, c, t, b, r0, r);
        float* zp = z.data_ptr<float>();
        for (int64_t k = 0; k < r; ++k) {
          fold_row(zp + k * z.stride(0), c.vc, c0, lab[r0 + k], p.o, with_stats, st, r0 + k);
        }
      }
      if (p.native) cpublas::brgemm_release(true);  // the thread's matrix-unit state
    });
  }

  const auto f32 = p.hidden.options().dtype(at::kFloat);
  const int64_t n_out = with_stats ? 7 : 3;
  std::vector<at::Tensor> out;
  std::vector<float*> ptr;
  for (int64_t k = 0; k < n_out; ++k) {
    out.push_back(at::empty({nv}, f32));
    ptr.push_back(out.back().data_ptr<float>());
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const double ninf = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < nv; ++i) {
    // The sums were taken against a reference point st.m within kSlack of the maximum zmax:
    // log_s = log sum e^(z - zmax) = log s + (m - zmax), a difference of two floats (exact in
    // double). A row of -inf logits (s = 0) has log_s = -inf, a NaN row max_logit NaN.
    const bool nan_row = std::isnan(st.m[i]);
    const double zmax = nan_row ? std::numeric_limits<double>::quiet_NaN() : st.zmax[i];
    const double log_s = st.s[i] > 0.0 ? std::log(st.s[i]) + (st.m[i] - zmax) : ninf;
    const bool ok = lab[i] >= 0 && lab[i] < vocab;
    const double logp = (static_cast<double>(st.target[i]) - zmax) - log_s;
    ptr[0][i] = ok ? static_cast<float>(logp) : nan;  // logps
    ptr[1][i] = static_cast<float>(zmax);              // max_logit
    ptr[2][i] = static_cast<float>(log_s);             // log_s
    if (with_stats) {
      ptr[3][i] = static_cast<float>(st.sumz[i]);                                 // logits_sum
      ptr[4][i] = static_cast<float>(std::log(st.s[i]) - st.t[i] / st.s[i]);     // entropy_sum
      ptr[5][i] = st.target[i] >= st.zmax[i] ? 1.f : 0.f;                        // top1_correct
      ptr[6][i] = static_cast<float>(std::log(st.s2[i]) - 2.0 * std::log(st.s[i]));  // lss
    }
  }
  if (keep) out.push_back(p.kept);
  return out;
}

// Gradients of sum_i grad_c[i] * logp_i: (dH (N x D, input dtype, zero on ignored rows) or an
// empty tensor, dW (V x D, weight dtype) or empty, db (V,) or empty).
std::vector<at::Tensor> backward(const at::Tensor& hidden, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& labels_c,
                                 const at::Tensor& rows, const at::Tensor& norm_c,
                                 const at::Tensor& grad_c, double pre_scale, double post_scale,
                                 bool softcap, bool need_h, bool need_w, bool need_b,
                                 int64_t chunk_v, int64_t tile_rows, bool native,
                                 bool split_vocab, const c10::optional<at::Tensor>& kept) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::NoGradGuard no_grad;
  Problem p = prepare(hidden, weight, bias, labels_c, rows, pre_scale, post_scale, softcap,
                      chunk_v, tile_rows, native, split_vocab);
  const int64_t nv = p.nv, vocab = p.vocab, dim = p.weight.size(1), n_threads = p.n_threads;
  if (kept.has_value()) {
    TORCH_CHECK(kept->dim() == 2 && kept->size(0) == nv && kept->size(1) == vocab &&
                    kept->scalar_type() == at::kFloat && kept->is_contiguous(),
                "kept must be the forward's contiguous [Nv x V] fp32 logits");
    p.kept = kept->detach();  // overwritten with the logit gradient, tile by tile
  }
  const bool have = p.kept.defined();  // logits kept by the forward: no recompute
  TORCH_CHECK(norm_c.dim() == 2 && norm_c.size(0) == 2 && norm_c.size(1) == nv &&
                  grad_c.dim() == 1 && grad_c.size(0) == nv,
              "norm_c must be (2, Nv) (max logit, log_s) and grad_c (Nv,)");
  TORCH_CHECK(!need_b || p.bias.has_value(), "need_b without a bias");
  const at::Tensor norm = norm_c.to(at::kFloat).contiguous();
  const at::Tensor g = grad_c.to(at::kFloat).contiguous();
  const auto f32 = p.hidden.options().dtype(at::kFloat);
  const int64_t dq = p.dq;  // dim, or on the native path dim rounded up to whole 64-column blocks
  at::Tensor dh_acc = need_h ? at::zeros({nv, dq}, f32) : at::Tensor();
  at::Tensor dw = need_w ? empty_huge(p.weight.sizes(), p.weight.options())
                         : at::empty({0}, p.weight.options());
  at::Tensor db = need_b ? at::empty({vocab}, p.bias->options())
                         : at::empty({0}, p.weight.options());
  // Per thread: partial dW / db of the chunk over the thread's row blocks, summed in thread order
  // after each chunk (the block-to-thread split is fixed by the thread count, so results repeat
  // bitwise from run to run).
  at::Tensor dw_part = need_w && !p.native ? at::empty({n_threads, p.vc_max, dq}, f32)
                                         : at::Tensor();
  at::Tensor db_part = need_b ? at::empty({n_threads, p.vc_max}, f32) : at::Tensor();
  std::vector<char> used(n_threads, 0);
  // native path: per thread G in bf16 (rows x kv_max, K padded to even with zeros); the chunk's G^T
  // for all rows (vc_max x nq, nq = Nv rounded up to even), which a second pass over 32-row
  // slices of the chunk turns into dW[slice] = G^T[slice] H with K = all rows in one GEMM (no
  // per-thread partials to add), through an L2-sized fp32 slice per thread; all rows packed once
  // as that GEMM's B.
  const int64_t kv_max = round_up(p.vc_max, 2), nq = round_up(nv, 2), nbd = dq / kBlockN;
  constexpr int64_t kSlice = 32;
  at::Tensor g16, gtall, hk, wslice;
  if (p.native) {
    const auto bf = p.hidden.options();
    g16 = at::zeros({n_threads, std::min(p.tile_rows, nv), kv_max}, bf);
    if (need_w) {
      gtall = at::zeros({p.vc_max, nq}, bf);
      wslice = at::empty({n_threads, kSlice, dq}, f32);
      hk = at::empty({nbd * nq * kBlockN}, bf);
      at::parallel_for(0, nbd, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t n = std::min(kBlockN, dim - j * kBlockN);
          pack_rows(bits(p.h) + j * kBlockN, nv, n, dim, mbits(hk) + j * nq * kBlockN);
        }
      });
    }
  }
  const int64_t* lab = p.labels.data_ptr<int64_t>();
  const float* mp = norm.data_ptr<float>();  // max logit per row, then log_s per row
  const float* lsp = mp + nv;
  const float* gp = g.data_ptr<float>();

  if (p.split) {
    // Each thread takes a share of the chunks over all rows: it writes dW and db of its chunks
    // whole (no partials to add), and accumulates dH into its own [Nv x D] partial; those are
    // summed in thread order after the sweep (the chunk-to-thread split is fixed by the thread
    // count, so results repeat bitwise from run to run).
    const int64_t n_chunks = (vocab + p.vc_max - 1) / p.vc_max;
    at::Tensor dh_part = need_h ? at::zeros({n_threads, nv, dim}, f32) : at::Tensor();
    const bool dw_direct = need_w && p.weight.scalar_type() == at::kFloat;  // no fp32 copy
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t k0, int64_t k1) {
      const WorkerState worker(inference);
      const int64_t t = at::get_thread_num();
      used[t] = 1;
      for (int64_t k = k0; k < k1; ++k) {
        const Chunk c = chunk_at(p, k * p.vc_max, /*for_backward=*/true, t);
        at::Tensor dw_t = !need_w ? at::Tensor()
                          : dw_direct ? dw.narrow(0, c.c0, c.vc)
                                      : dw_part[t].narrow(0, 0, c.vc);
        at::Tensor db_t = need_b ? db_part[t].narrow(0, 0, c.vc) : at::Tensor();
        for (int64_t b = 0; b < p.n_blocks; ++b) {
          const int64_t r0 = b * p.tile_rows, r = std::min(p.tile_rows, nv - r0);
          at::Tensor z = have ? kept_tile(p, c, r0, r) : tile_logits(p, c, t, b, r0, r);
          float* zp = z.data_ptr<float>();
          for (int64_t i = 0; i < r; ++i) {
            const int64_t y = lab[r0 + i];  // outside [0, V): no one-hot term (see backend.py)
            grad_row(zp + i * z.stride(0), c.vc, c.c0, y, mp[r0 + i], lsp[r0 + i], gp[r0 + i], p.o,
                     have);
          }
          if (need_h) dh_part[t].narrow(0, r0, r).addmm_(z, c.w);
          if (need_w) {
            const at::Tensor h_b = p.h.narrow(0, r0, r);
            if (b == 0) at::mm_out(dw_t, z.t(), h_b);
            else dw_t.addmm_(z.t(), h_b);
          }
          if (need_b) {
            if (b == 0) at::sum_out(db_t, z, {0});
            else db_t.add_(z.sum(0));
          }
        }
        if (need_w && !dw_direct) dw.narrow(0, c.c0, c.vc).copy_(dw_t);
        if (need_b) db.narrow(0, c.c0, c.vc).copy_(db_t);
      }
    });
    for (int64_t t = 0; t < n_threads && need_h; ++t) {
      if (used[t]) dh_acc.add_(dh_part[t]);
    }
  }
  for (int64_t c0 = 0; c0 < vocab && !p.split; c0 += p.vc_max) {
    const Chunk c = chunk_at(p, c0, /*for_backward=*/true);
    const int64_t vc = c.vc, kv = round_up(vc, 2);
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, p.n_blocks, 1, [&](int64_t b0, int64_t b1) {
      const WorkerState worker(inference);
      const int64_t t = at::get_thread_num();
      used[t] = 1;
      at::Tensor dw_t = need_w && !p.native ? dw_part[t].narrow(0, 0, vc) : at::Tensor();
      at::Tensor db_t = need_b ? db_part[t].narrow(0, 0, vc) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * p.tile_rows, r = std::min(p.tile_rows, nv - r0);
        at::Tensor z = have ? kept_tile(p, c, r0, r) : tile_logits(p, c, t, b, r0, r);
        float* zp = z.data_ptr<float>();
        for (int64_t k = 0; k < r; ++k) {
          const int64_t i = r0 + k;
          const int64_t y = lab[i];  // outside [0, V): no one-hot term
          grad_row(zp + k * z.stride(0), vc, c0, y, mp[i], lsp[i], gp[i], p.o, have);
        }
        if (p.native) {
          // G rounded to bf16 (zero padding stays zero), then dH[tile] += G W[chunk] on the
          // matrix units (fp32 accumulation); G^T is kept for the dW pass after the tiles.
          at::Tensor gb = g16[t];
          gb.narrow(0, 0, r).narrow(1, 0, vc).copy_(z);
          if (kv > vc) gb.narrow(0, 0, r).narrow(1, vc, kv - vc).zero_();
          if (need_h) {
            brgemm_blocks(r, kv, bits(gb), kv_max, bits(c.wk), dq,
                          dh_acc.data_ptr<float>() + r0 * dq, dq, true);
          }
          if (need_w) {  // this tile's columns of G^T (its padding column stays zero)
            gtall.narrow(0, 0, vc).narrow(1, r0, r).copy_(gb.narrow(0, 0, r).narrow(1, 0, vc).t());
          }
        } else {
          if (need_h) dh_acc.narrow(0, r0, r).addmm_(z, c.w);  // this block's rows only
          if (need_w) {
            const at::Tensor h_b = p.h.narrow(0, r0, r);
            if (b == b0) at::mm_out(dw_t, z.t(), h_b);
            else dw_t.addmm_(z.t(), h_b);
          }
        }
        if (need_b) {
          if (b == b0) at::sum_out(db_t, z, {0});
          else db_t.add_(z.sum(0));
        }
      }
      if (p.native) cpublas::brgemm_release(true);
    });
    if (p.native && need_w) {
      at::parallel_for(0, (vc + kSlice - 1) / kSlice, 1, [&](int64_t s0, int64_t s1) {
        const WorkerState worker(inference);
        at::Tensor ws = wslice[at::get_thread_num()];
        for (int64_t sl = s0; sl < s1; ++sl) {
          const int64_t v0 = sl * kSlice, m = std::min(kSlice, vc - v0);
          brgemm_blocks(m, nq, bits(gtall) + v0 * nq, nq, bits(hk), dq, ws.data_ptr<float>(),
                        dq, false);
          dw.narrow(0, c0 + v0, m).copy_(ws.narrow(0, 0, m).narrow(1, 0, dim));
        }
        cpublas::brgemm_release(true);
      });
    }
    at::Tensor dw_c, db_c;
    for (int64_t t = 0; t < n_threads; ++t) {
      if (!used[t]) continue;
      if (need_w && !p.native) {
        at::Tensor part = dw_part[t].narrow(0, 0, vc);
        dw_c = dw_c.defined() ? dw_c.add_(part) : part;
      }
      if (need_b) {
        at::Tensor part = db_part[t].narrow(0, 0, vc);
        db_c = db_c.defined() ? db_c.add_(part) : part;
      }
    }
    if (need_w && !p.native) dw.narrow(0, c0, vc).copy_(dw_c);
    if (need_b) db.narrow(0, c0, vc).copy_(db_c);
  }
  at::Tensor dh = at::empty({0}, p.hidden.options());
  if (need_h) {
    dh = at::zeros_like(p.hidden);
    dh.index_copy_(0, rows, dh_acc.narrow(1, 0, dim).to(p.hidden.scalar_type()));
  }
  return {dh, dw, db};
}

namespace {

// CPUID leaf 7, subleaf 1, EAX bit 5: the AVX512-BF16 dot-product instructions (Zen 4, Cooper
// Lake, Sapphire Rapids and later).
bool cpu_has_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1u;
}

// One packed-B brgemm on small integers (exact in bf16 and in fp32) against the exact product:
// the native path runs only where oneDNN's brgemm really computes it on this CPU (a fallback that
// reads the packed operand another way is caught here rather than trusted).
bool brgemm_selftest() {
  constexpr int64_t M = 16, N = kBlockN, K = 32;
  std::vector<bf16_bits> a(M * K), b(K * N), bp(K * N);
  std::vector<float> c(M * N, 0.f);
  auto to_bits = [](float x) { return at::BFloat16(x).x; };
  for (int64_t i = 0; i < M * K; ++i) a[i] = to_bits(static_cast<float>(i % 7) - 3.f);
  for (int64_t i = 0; i < K * N; ++i) b[i] = to_bits(static_cast<float>(i % 5) - 2.f);
  pack_rows(b.data(), K, N, N, bp.data());
  try {
    cpublas::brgemm(M, N, K, K, N, N, false, reinterpret_cast<const at::BFloat16*>(a.data()),
                    reinterpret_cast<const at::BFloat16*>(bp.data()), c.data(), true);
    cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      float want = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        want += static_cast<float>((i * K + k) % 7 - 3) * static_cast<float>((k * N + j) % 5 - 2);
      }
      if (c[i * N + j] != want) return false;
    }
  }
  return true;
}

}  // namespace

// Which bf16 units the native path runs on here: "amx" (AMX tiles), "avx512_bf16" (AVX512-BF16
// dot products on the vector units), or "" (neither, or brgemm failed its self-test: widen).
std::string bf16_units() {
  static const std::string units = [] {
    if (!brgemm_selftest()) return std::string();
    if (cpublas::could_pack(at::kBFloat16)) return std::string("amx");
    if (cpu_has_avx512_bf16()) return std::string("avx512_bf16");
    return std::string();
  }();
  return units;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dpo_kernels CPU backend: fused linear log-probs (forward and backward)";
  m.def("forward", &forward, "per-token log-probs, softmax norm (max logit, log_s) and stats of the compacted rows");
  m.def("backward", &backward, "gradients of sum(grad_c * logp) w.r.t. hidden, weight, bias");
  m.def("bf16_units", &bf16_units, "the bf16 units of the native path here: amx, avx512_bf16 or ''");
}
