/* The decoder's per-row operations for bf16 rows on CPUs with AVX512: RMSNorm (with the residual
 * add before it), rotary embedding, the gated MLP's SiLU(gate) * up, and the 16-point Hadamard
 * rotation an int8 Linear may apply to its input (domino_backend/quant.py).
 *
 * Each computes in fp32 from bf16 inputs and rounds once to bf16 (nearest even). A row's result
 * depends on that row alone: reductions run over the row's own values in a fixed order, threads
 * split rows (never a row), so any M and any thread count give the same bits, which the
 * bitwise-lossless verification relies on. Compiled with -ffp-contract=off; explicit fused
 * multiply-adds are part of the fixed sequence.
 */
#include <math.h>

#include "simd.h"

#define PARALLEL_MIN 65536 /* elements below which one thread does the whole call */

/* With delta: sum[r] = bf16(h[r] + delta[r]) (torch's bf16 add) and x = sum[r]; else x = h[r]. Then
 * out[r] = bf16(x * (1 / sqrt(mean(x^2) + eps)) * w). Rows of width d; h and delta at the given
 * strides (elements), sum and out contiguous. */
void add_rms_norm(const uint16_t *h, int64_t h_stride, const uint16_t *delta, int64_t delta_stride, uint16_t *sum,
                  int64_t rows, int64_t d, const uint16_t *w, float eps, uint16_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(rows * d >= PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t *x = h + r * h_stride;
    if (delta) {
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 m = lanes(d - i);
        store_bf16x16(sum + r * d + i, _mm512_add_ps(bf16x16(x + i, m), bf16x16(delta + r * delta_stride + i, m)), m);
      }
      x = sum + r * d;
    }
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 v = bf16x16(x + i, lanes(d - i));
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(ss) / (float)d + eps));
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 m = lanes(d - i);
      store_bf16x16(out + r * d + i, _mm512_mul_ps(_mm512_mul_ps(bf16x16(x + i, m), inv), bf16x16(w + i, m)), m);
    }
  }
}

/* In place, per row r and head: x = x * cos[r] + rotate_half(x) * sin[r] (rotate_half(x) =
 * [-x2, x1] for halves x1, x2), each output element bf16(a * c + b * s) in fp32. x: rows x heads x
 * d at row stride x_stride; cos, sin: rows x d, contiguous. */
void rope(uint16_t *x, int64_t x_stride, int64_t rows, int heads, int64_t d, const uint16_t *cos_, const uint16_t *sin_,
          int threads) {
  const int64_t half = d / 2;
#pragma omp parallel for schedule(static) num_threads(rows * heads * d >= PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < rows; r++) {
    const uint16_t *c = cos_ + r * d, *s = sin_ + r * d;
    for (int hd = 0; hd < heads; hd++) {
      uint16_t *xh = x + r * x_stride + hd * d;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = lanes(half - i);
        const __m512 x1 = bf16x16(xh + i, m), x2 = bf16x16(xh + half + i, m);
        const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(x1, bf16x16(c + i, m)), _mm512_mul_ps(x2, bf16x16(s + i, m)));
        const __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, bf16x16(c + half + i, m)),
                                        _mm512_mul_ps(x1, bf16x16(s + half + i, m)));
        store_bf16x16(xh + i, lo, m);
        store_bf16x16(xh + half + i, hi, m);
      }
    }
  }
}

/* out[r] = bf16(g / (1 + e^-g) * u) for rows of width d (strides in elements). */
void silu_mul(const uint16_t *g, int64_t g_stride, const uint16_t *u, int64_t u_stride, int64_t rows, int64_t d,
              uint16_t *out, int64_t out_stride, int threads) {
#pragma omp parallel for schedule(static) num_threads(rows * d >= PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 m = lanes(d - i);
      const __m512 x = bf16x16(g + r * g_stride + i, m);
      const __m512 sig = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
      store_bf16x16(out + r * out_stride + i, _mm512_mul_ps(sig, bf16x16(u + r * u_stride + i, m)), m);
    }
  }
}

/* out[r] = bf16(H16 x[r] / 4) in blocks of 16 channels: the orthonormal 16-point Hadamard transform
 * of each block (d a multiple of 16; out may be x). Four butterfly stages h = 1, 2, 4, 8, in that
 * order: the lanes i and i ^ h become (a + b, a - b), one rounding each (the explicit multiply-add
 * by +-1 is exact); then * 1/4, exact. kernels/rowops.py `hadamard16_reference` does the same. */
void hadamard16(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t d, uint16_t *out, int64_t out_stride,
                int threads) {
  static const int shift[4] = {1, 2, 4, 8};
  __m512i partner[4];
  __m512 sign[4];
  for (int s = 0; s < 4; s++) {
    int idx[16];
    float sg[16];
    for (int i = 0; i < 16; i++) {
      idx[i] = i ^ shift[s];
      sg[i] = (i & shift[s]) ? -1.f : 1.f;
    }
    partner[s] = _mm512_loadu_si512(idx);
    sign[s] = _mm512_loadu_ps(sg);
  }
#pragma omp parallel for schedule(static) num_threads(rows * d >= PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t i = 0; i < d; i += 16) {
      __m512 v = bf16x16(x + r * x_stride + i, 0xFFFF);
      for (int s = 0; s < 4; s++)  /* lane i: v[i ^ h] + (+-1) v[i], i.e. a + b or a - b */
        v = _mm512_fmadd_ps(sign[s], v, _mm512_permutexvar_ps(partner[s], v));
      store_bf16x16(out + r * out_stride + i, _mm512_mul_ps(v, _mm512_set1_ps(0.25f)), 0xFFFF);
    }
  }
}
