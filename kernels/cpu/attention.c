/* Row-wise attention for CPUs with AVX512: every query row of a forward in one call, each with the
 * bits it would have if it were decoded alone.
 *
 * One call covers one sequence's rows in one layer. Query row i (of M, at position past + i) sees
 * the cached keys 0 .. past - 1, then the rows j <= i of this call whose mask[i * M + j] is set (a
 * chain: every j <= i; a draft tree: the row's ancestors and itself), in increasing order. For each
 * (row, kv head) task, the G = H / KV query heads sharing that kv head compute, in fp32:
 *
 *     s_j = dot(q, k_j) * scale;  p_j = exp(s_j - max s);  out = (sum_j p_j v_j) / (sum_j p_j)
 *
 * Invariants the engine relies on (bitwise-lossless verification):
 *  - a task's arithmetic is a fixed sequence of fp32 operations over its own key list: the dot
 *    product sums D lanes in a fixed tree, the softmax and the weighted sum run over keys in order,
 *    so the result depends on the row's query and visible keys only, not on M, the mask of other
 *    rows, or which thread runs it (threads split tasks, never keys);
 *  - decoding a token (M = 1) runs the same code, so a verify row equals the decode step it stands
 *    for, and a tree row equals decoding its branch.
 * Compiled with -ffp-contract=off; the explicit _mm512_fmadd_ps below are part of the fixed sequence.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MAX_G 16 /* query heads per kv head */
#define MAX_D 256
#define KEYS 16 /* keys per block: one score per lane */

/* Lane t of the result = the sum of a[t]'s 16 lanes, summed in a fixed tree. */
static inline __m512 sum_lanes16(const __m512 *a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  /* c[i]'s 128-bit lane L: lane-L partial sums of a[4i .. 4i+3] */
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

/* One (row, kv head) task over n keys: idx[j] is key j's position in the cache (k/v rows of stride d
 * for this kv head). q, out: g heads x d (bf16). scores: g x (n rounded up to KEYS) floats; kf:
 * KEYS x d floats of scratch. A block's keys past n are zero (score 0, then masked out of the
 * softmax), so the tail runs the same code. */
static void attend_task(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int32_t *idx, int64_t n,
                        int g, int d, float scale, float *scores, float *kf, uint16_t *out) {
  const int dv = d / 16;
  const int64_t n16 = (n + KEYS - 1) / KEYS * KEYS;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n16; j0 += KEYS) {
    for (int t = 0; t < KEYS; t++)
      for (int c = 0; c < dv; c++)
        _mm512_storeu_ps(kf + t * d + 16 * c,
                         j0 + t < n ? bf16x16(k + (int64_t)idx[j0 + t] * d + 16 * c, 0xffff) : _mm512_setzero_ps());
    for (int h = 0; h < g; h++) {
      const uint16_t *qh = q + (int64_t)h * d;
      __m512 acc[KEYS];
      __m512 qc = bf16x16(qh, 0xffff);
      for (int t = 0; t < KEYS; t++) acc[t] = _mm512_mul_ps(qc, _mm512_loadu_ps(kf + t * d));
      for (int c = 1; c < dv; c++) {
        qc = bf16x16(qh + 16 * c, 0xffff);
        for (int t = 0; t < KEYS; t++) acc[t] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kf + t * d + 16 * c), acc[t]);
      }
      _mm512_storeu_ps(scores + h * n16 + j0, _mm512_mul_ps(sum_lanes16(acc), vscale));
    }
  }
  for (int h = 0; h < g; h++) { /* softmax weights, unnormalized, in place; lanes past n -> 0 */
    float *s = scores + h * n16;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n16; j += KEYS) {
      const __mmask16 live = lanes(n - j);
      vmx = _mm512_mask_max_ps(vmx, live, vmx, _mm512_loadu_ps(s + j));
    }
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n16; j += KEYS) {
      const __mmask16 live = lanes(n - j);
      const __m512 p = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx)));
      _mm512_storeu_ps(s + j, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    scores[-1 - h] = 1.f / _mm512_reduce_add_ps(vsum); /* stashed in front of the scores */
  }
  for (int h0 = 0; h0 < g; h0 += 4) { /* out = sum_j p_j v_j, four heads per pass over the values */
    const int hs = g - h0 < 4 ? g - h0 : 4;
    for (int c0 = 0; c0 < dv; c0 += 4) {
      const int cs = dv - c0 < 4 ? dv - c0 : 4;
      __m512 acc[4][4];
      for (int a = 0; a < 4; a++)
        for (int c = 0; c < 4; c++) acc[a][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j++) {
        const uint16_t *vj = v + (int64_t)idx[j] * d + 16 * c0;
        __m512 vc[4];
        for (int c = 0; c < cs; c++) vc[c] = bf16x16(vj + 16 * c, 0xffff);
        for (int a = 0; a < hs; a++) {
          const __m512 p = _mm512_set1_ps(scores[(h0 + a) * n16 + j]);
          for (int c = 0; c < cs; c++) acc[a][c] = _mm512_fmadd_ps(p, vc[c], acc[a][c]);
        }
      }
      for (int a = 0; a < hs; a++) {
        const __m512 inv = _mm512_set1_ps(scores[-1 - (h0 + a)]);
        for (int c = 0; c < cs; c++)
          _mm256_storeu_si256((__m256i *)(out + (int64_t)(h0 + a) * d + 16 * (c0 + c)),
                              to_bf16(_mm512_mul_ps(acc[a][c], inv)));
      }
    }
  }
}

/* q: [M, H, D] bf16 at row stride q_stride (elements); out: [M, H, D] contiguous. k, v: [KV, cap, D]
 * bf16, this sequence's cache. k_new, v_new (or NULL): the call's own rows, [M, KV, D] at row
 * stride new_stride, first written to the cache at past .. past + M - 1 (else already there).
 * mask: [M, M] uint8 or NULL (causal). rows: the r row indices to compute, or NULL for all M (r
 * ignored); others are left untouched. Returns 0, or -1 for a shape it does not take. */
int attend_rows(const uint16_t *q, int64_t q_stride, const uint16_t *k_new, const uint16_t *v_new, int64_t new_stride,
                uint16_t *k, uint16_t *v, int64_t cap, int64_t past, int64_t m, int h, int kv, int d, float scale,
                const uint8_t *mask, const int32_t *rows, int64_t r, uint16_t *out, int threads) {
  const int g = h / kv;
  if (d % 16 || d > MAX_D || g > MAX_G || g * kv != h) return -1;
  if (k_new)
    for (int64_t i = 0; i < m; i++)
      for (int hk = 0; hk < kv; hk++) {
        memcpy(k + (hk * cap + past + i) * d, k_new + i * new_stride + (int64_t)hk * d, (size_t)d * 2);
        memcpy(v + (hk * cap + past + i) * d, v_new + i * new_stride + (int64_t)hk * d, (size_t)d * 2);
      }
  if (!rows) r = m;
  const int64_t tasks = r * kv;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tasks; t++) {
    const int64_t i = rows ? rows[t / kv] : t / kv;
    const int hk = (int)(t % kv);
    const int64_t n_max = past + i + 1;
    const int64_t n16 = (n_max + KEYS - 1) / KEYS * KEYS;
    int32_t *idx = malloc(sizeof(int32_t) * n_max);
    float *buf = malloc(sizeof(float) * (MAX_G + g * n16 + KEYS * d));
    int64_t n = 0;
    for (int64_t j = 0; j < past; j++) idx[n++] = (int32_t)j;
    for (int64_t j = 0; j <= i; j++)
      if (!mask || mask[i * m + j]) idx[n++] = (int32_t)(past + j);
    attend_task(q + i * q_stride + (int64_t)hk * g * d, k + hk * cap * d, v + hk * cap * d, idx, n, g, d, scale,
                buf + MAX_G, buf + MAX_G + g * n16, out + (i * h + (int64_t)hk * g) * d);
    free(idx);
    free(buf);
  }
  return 0;
}
