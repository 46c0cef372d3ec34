// Probe, not part of vitlab: a bfloat16 attention forward for short sequences on AMX CPUs, written to measure
// how far a hand-written kernel gets past PyTorch's CPU flash attention (benchmarks/explore_attention_kernel.py,
// RESULTS "A hand-written AMX attention kernel").
//
// Per (batch, head): K^T and V are put into the VNNI-2 layout that AMX bfloat16 tiles read (vector transposes,
// no oneDNN reorder), then for each block of queries: S = q K^T (at::native::cpublas::brgemm, float32 out),
// P = exp(scale * (S - rowmax)) written as bfloat16 with the row sum in float32, O = P V (brgemm), and
// O / rowsum written straight into a (B, N, H, D) output, so the caller's transpose-and-reshape is free.
// One key block (the whole sequence): no online-softmax rescaling, which is what short sequences allow.
//
// stop_after: 0 runs everything; 1 stops after packing, 2 after q K^T, 3 after the softmax, 4 after P V
// (the stage costs are differences of these). fast_exp: a degree-4 polynomial 2^x instead of
// Vectorized<float>::exp_u20 (P is rounded to bfloat16 anyway). trim: the last q K^T block computes only the
// keys that exist (rounded up to 16) instead of a full 64.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
namespace cpublas = at::native::cpublas;
static constexpr int64_t kBlk = 64;  // brgemm B blocks: 64 columns (oneDNN's packed ld must be 16/32/48/64)

// 16x16 transpose of 32-bit words: r[i] holds row i on entry and column i on return.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// 2^t for t <= 0 (t = (s - rowmax) * scale * log2 e): degree-4 polynomial on the fraction, relative error about
// 4e-5; far below zero scalef gives 0, as exp does
static inline __m512 exp2_poly4(__m512 t) {
  const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(1.3534167e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.2011464e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4144276e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9300383e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, fi);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale_d,
                     int64_t stop_after, bool fast_exp, bool trim, int64_t q_split, int64_t k_align) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
              v.scalar_type() == at::kBFloat16 && q.dim() == 4, "bfloat16 (B, H, N, D) inputs");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "last dimension contiguous");
  TORCH_CHECK(D % kBlk == 0, "head dim a multiple of 64");
  TORCH_CHECK(k_align % 2 == 0, "k_align even (VNNI pairs)");
  TORCH_CHECK(cpublas::could_pack(at::kBFloat16), "no AMX bfloat16 brgemm on this CPU");
  const float scale = static_cast<float>(scale_d);
  const int64_t Np = (N + kBlk - 1) / kBlk * kBlk;  // keys, padded, as columns of q K^T
  const int64_t Ne = (N + k_align - 1) / k_align * k_align;  // keys, padded, as the reduction of P V
  const int64_t W = D / 2;                           // 32-bit words per key row
  const int64_t qSplit = std::min(q_split, N);
  auto out = at::empty({B, N, H, D}, q.options());
  const BFloat16* qd = q.const_data_ptr<BFloat16>();
  const BFloat16* kd = k.const_data_ptr<BFloat16>();
  const BFloat16* vd = v.const_data_ptr<BFloat16>();
  BFloat16* od = out.data_ptr<BFloat16>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsN = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsN = v.stride(2);

  alignas(64) uint16_t lo_idx[32], hi_idx[32];  // interleave a[i], b[i] for i < 16 and for 16 <= i < 32
  for (int i = 0; i < 16; ++i) {
    lo_idx[2 * i] = i;
    lo_idx[2 * i + 1] = 32 + i;
    hi_idx[2 * i] = 16 + i;
    hi_idx[2 * i + 1] = 48 + i;
  }
  const __m512i vlo = _mm512_load_si512(lo_idx), vhi = _mm512_load_si512(hi_idx);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<BFloat16> kpack, vpack, P;
    static thread_local std::vector<float> S, O, rsum;
    kpack.resize(D * Np);
    vpack.resize(Ne * D);
    P.resize(qSplit * Ne);
    S.resize(qSplit * Np);
    O.resize(qSplit * D);
    rsum.resize(qSplit);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const BFloat16* kp = kd + b * ksB + h * ksH;
      const BFloat16* vp = vd + b * vsB + h * vsH;
      // K^T, 64 keys per block: word (w, j) = K[j][2w : 2w + 2] at w * 64 + j
      for (int64_t j0 = 0; j0 < Np; j0 += kBlk) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(kpack.data() + j0 * D);
        for (int64_t jg = 0; jg < kBlk; jg += 16) {
          for (int64_t wg = 0; wg < W; wg += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; ++i) {
              const int64_t j = j0 + jg + i;
              r[i] = j < N ? _mm512_loadu_si512(kp + j * ksN + 2 * wg) : _mm512_setzero_si512();
            }
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (wg + i) * kBlk + jg, r[i]);
          }
        }
      }
      // V, 64 features per block: rows n and n + 1 interleaved element by element
      for (int64_t d0 = 0; d0 < D; d0 += kBlk) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(vpack.data() + d0 * Ne);
        for (int64_t n = 0; n < Ne; n += 2) {
          const __m512i zero = _mm512_setzero_si512();
          const __m512i a0 = n < N ? _mm512_loadu_si512(vp + n * vsN + d0) : zero;
          const __m512i a1 = n < N ? _mm512_loadu_si512(vp + n * vsN + d0 + 32) : zero;
          const __m512i b0 = n + 1 < N ? _mm512_loadu_si512(vp + (n + 1) * vsN + d0) : zero;
          const __m512i b1 = n + 1 < N ? _mm512_loadu_si512(vp + (n + 1) * vsN + d0 + 32) : zero;
          uint16_t* row = dst + n * kBlk;
          _mm512_storeu_si512(row, _mm512_permutex2var_epi16(a0, vlo, b0));
          _mm512_storeu_si512(row + 32, _mm512_permutex2var_epi16(a0, vhi, b0));
          _mm512_storeu_si512(row + 64, _mm512_permutex2var_epi16(a1, vlo, b1));
          _mm512_storeu_si512(row + 96, _mm512_permutex2var_epi16(a1, vhi, b1));
        }
      }
      if (stop_after == 1) continue;
      for (int64_t m0 = 0; m0 < N; m0 += qSplit) {
        const int64_t M = std::min(qSplit, N - m0);
        const BFloat16* qp = qd + b * qsB + h * qsH + m0 * qsN;
        for (int64_t j0 = 0; j0 < Np; j0 += kBlk) {
          const int64_t cols = trim ? std::min(kBlk, (N - j0 + 15) / 16 * 16) : kBlk;
          cpublas::brgemm(M, cols, D, qsN, kBlk, Np, false, qp, kpack.data() + j0 * D, S.data() + j0, true);
        }
        if (stop_after == 2) continue;
        for (int64_t r = 0; r < M; ++r) {
          const float* s = S.data() + r * Np;
          __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          for (int64_t j = 0; j < N; j += 16) {
            const __mmask16 mk = j + 16 <= N ? (__mmask16)0xffff : (__mmask16)((1u << (N - j)) - 1);
            vmax = _mm512_mask_max_ps(vmax, mk, vmax, _mm512_loadu_ps(s + j));
          }
          const float mx = _mm512_reduce_max_ps(vmax);
          const float log2e = 1.4426950408889634f;
          const float sc = fast_exp ? scale * log2e : scale;  // exp(scale (s - mx)) = 2^(scale log2e (s - mx))
          const __m512 vscale = _mm512_set1_ps(sc), vshift = _mm512_set1_ps(-mx * sc);
          __m512 vsum = _mm512_setzero_ps();
          BFloat16* p = P.data() + r * Ne;
          int64_t j = 0;
          for (; j < N; j += 16) {
            const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, vshift);
            __m512 e = fast_exp ? exp2_poly4(x) : static_cast<__m512>(Vec(x).exp_u20());
            if (j + 16 > N) e = _mm512_maskz_mov_ps((__mmask16)((1u << (N - j)) - 1), e);
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
          }
          for (; j < Ne; ++j) p[j] = BFloat16(0.f);
          rsum[r] = 1.f / _mm512_reduce_add_ps(vsum);
        }
        if (stop_after == 3) continue;
        for (int64_t d0 = 0; d0 < D; d0 += kBlk) {
          cpublas::brgemm(M, kBlk, Ne, Ne, kBlk, D, false, P.data(), vpack.data() + d0 * Ne, O.data() + d0, true);
        }
        if (stop_after == 4) continue;
        for (int64_t r = 0; r < M; ++r) {
          BFloat16* o = od + ((b * N + m0 + r) * H + h) * D;
          const __m512 vr = _mm512_set1_ps(rsum[r]);
          const float* src = O.data() + r * D;
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + d), vr);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)_mm512_cvtneps_pbh(x));
          }
        }
      }
    }
    cpublas::brgemm_release(true);
  });
  return out.transpose(1, 2);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("attention", &attention); }
