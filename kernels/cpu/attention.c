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
 *    product sums the D channels in order (keys transposed once per call, one key per lane, so a
 *    key's score does not depend on its neighbours), the softmax and the weighted sum run over
 *    keys in order,
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

/* The keys 0 .. n - 1 of every kv head, transposed once per call so that a block of KEYS keys
 * gives one score per lane: kt[((hk * nb + b) * d + c) * KEYS + t] = k[hk][b * KEYS + t][c], bf16
 * (nb = n / KEYS rounded up; keys past n are 0). Every row and query head of the call reads it. */
static void transpose_keys(const uint16_t *k, int64_t cap, int kv, int d, int64_t n, uint16_t *kt, int threads) {
  const int64_t nb = (n + KEYS - 1) / KEYS;
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(2 * d));
#pragma omp parallel for schedule(static) num_threads(kv * nb * d >= 8192 ? threads : 1)
  for (int64_t task = 0; task < kv * nb; task++) {
    const int64_t hk = task / nb, b = task % nb;
    const uint16_t *src = k + (hk * cap + b * KEYS) * d;
    uint16_t *dst = kt + task * d * KEYS;
    const __mmask16 live = lanes(n - b * KEYS);
    for (int c = 0; c < d; c += 2) { /* channels c, c + 1 of the block's keys: one dword each */
      const __m512i pair = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, src + c, 1);
      _mm256_storeu_si256((__m256i *)(dst + c * KEYS), _mm512_cvtepi32_epi16(pair));
      _mm256_storeu_si256((__m256i *)(dst + (c + 1) * KEYS), _mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16)));
    }
  }
}

/* Scores of the g query heads (qt: d x g fp32, channel-major) against key blocks 0 .. nb - 1 (kt:
 * one kv head's transposed blocks): scores[h * stride + b * KEYS + t] = (sum_c q_h[c] * k_t[c], c = 0, 1, ..)
 * * scale, a sequential fp32 sum per key. Inlined with a constant g (see `scores_g`): the g
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void scores_block(const float *qt, const uint16_t *kt, int64_t nb, int g,
                                                              int d, float scale, float *scores, int64_t stride) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < nb; b++) {
    const uint16_t *kb = kt + b * d * KEYS;
    __m512 acc[MAX_G];
    const __m512 k0 = bf16x16(kb, 0xffff);
#pragma GCC unroll 16
    for (int h = 0; h < g; h++) acc[h] = _mm512_mul_ps(_mm512_set1_ps(qt[h]), k0);
    for (int c = 1; c < d; c++) {
      const __m512 kc = bf16x16(kb + c * KEYS, 0xffff);
      const float *qc = qt + c * g;
#pragma GCC unroll 16
      for (int h = 0; h < g; h++) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(qc[h]), kc, acc[h]);
    }
#pragma GCC unroll 16
    for (int h = 0; h < g; h++) _mm512_storeu_ps(scores + h * stride + b * KEYS, _mm512_mul_ps(acc[h], vscale));
  }
}

static void scores_g(const float *qt, const uint16_t *kt, int64_t nb, int g, int d, float scale, float *scores,
                     int64_t stride) {
  switch (g) {
#define G(N) \
  case N: scores_block(qt, kt, nb, N, d, scale, scores, stride); break;
    G(1) G(2) G(3) G(4) G(5) G(6) G(7) G(8) G(9) G(10) G(11) G(12) G(13) G(14) G(15) G(16)
#undef G
  }
}

/* One (row, kv head) task over its n visible keys: idx[j] is key j's position in the cache, in
 * increasing order, the last one at n_full - 1 (a chain sees every key below n_full, a tree row
 * skips the rows off its branch). q, out: g heads x d (bf16); kt: this kv head's transposed keys
 * (`transpose_keys`); v: its value rows (stride d). scores: g x (n_full rounded up to KEYS) floats.
 * Scores are computed for all keys below n_full, then the visible ones are moved to the front in
 * order, so the softmax and the weighted sum see exactly the key list decoding the branch alone
 * would (a key's score does not depend on its block), and lanes past n are masked out. */
static void attend_task(const uint16_t *q, const uint16_t *kt, const uint16_t *v, const int32_t *idx, int64_t n,
                        int64_t n_full, int g, int d, float scale, float *scores, uint16_t *out) {
  const int dv = d / 16;
  const int64_t n16 = (n_full + KEYS - 1) / KEYS * KEYS;
  float qt[MAX_D * MAX_G];
  for (int h = 0; h < g; h++)
    for (int c = 0; c < d; c++) {
      const uint32_t bits = (uint32_t)q[(int64_t)h * d + c] << 16;
      memcpy(qt + c * g + h, &bits, 4);
    }
  scores_g(qt, kt, n16 / KEYS, g, d, scale, scores, n16);
  if (n < n_full)
    for (int h = 0; h < g; h++)
      for (int64_t j = 0; j < n; j++) scores[h * n16 + j] = scores[h * n16 + idx[j]]; /* idx[j] >= j */
  const int64_t live16 = (n + KEYS - 1) / KEYS * KEYS; /* the softmax's blocks: the n visible keys' */
  for (int h = 0; h < g; h++) { /* softmax weights, unnormalized, in place; lanes past n -> 0 */
    float *s = scores + h * n16;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < live16; j += KEYS) {
      const __mmask16 live = lanes(n - j);
      vmx = _mm512_mask_max_ps(vmx, live, vmx, _mm512_loadu_ps(s + j));
    }
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < live16; j += KEYS) {
      const __mmask16 live = lanes(n - j);
      const __m512 p = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx)));
      _mm512_storeu_ps(s + j, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    scores[-1 - h] = 1.f / _mm512_reduce_add_ps(vsum); /* stashed in front of the scores */
  }
  for (int h0 = 0; h0 < g; h0 += 4) { /* out = sum_j p_j v_j, a 4 heads x 64 channels register tile per pass */
    const int hs = g - h0 < 4 ? g - h0 : 4;
    const float *sc[4];
    for (int a = 0; a < 4; a++) sc[a] = scores + (int64_t)(a < hs ? h0 + a : h0) * n16; /* heads past g: unused */
    for (int c0 = 0; c0 < dv; c0 += 4) {
      __mmask16 cm[4]; /* channel chunks past d: loads masked to 0, never stored */
      for (int c = 0; c < 4; c++) cm[c] = c0 + c < dv ? 0xffff : 0;
      __m512 acc[4][4];
      for (int a = 0; a < 4; a++)
        for (int c = 0; c < 4; c++) acc[a][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j++) {
        const uint16_t *vj = v + (int64_t)idx[j] * d + 16 * c0;
        __m512 vc[4];
        for (int c = 0; c < 4; c++) vc[c] = bf16x16(vj + 16 * c, cm[c]);
        for (int a = 0; a < 4; a++) {
          const __m512 p = _mm512_set1_ps(sc[a][j]);
          for (int c = 0; c < 4; c++) acc[a][c] = _mm512_fmadd_ps(p, vc[c], acc[a][c]);
        }
      }
      for (int a = 0; a < hs; a++) {
        const __m512 inv = _mm512_set1_ps(scores[-1 - (h0 + a)]);
        for (int c = 0; c < 4 && c0 + c < dv; c++)
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
  const int64_t n_all = past + m, nb = (n_all + KEYS - 1) / KEYS;
  uint16_t *kt = malloc(sizeof(uint16_t) * (size_t)(kv * nb * KEYS * d));
  transpose_keys(k, cap, kv, d, n_all, kt, threads);
  const int64_t tasks = r * kv;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tasks; t++) {
    const int64_t i = rows ? rows[t / kv] : t / kv;
    const int hk = (int)(t % kv);
    const int64_t n_max = past + i + 1;
    const int64_t n16 = (n_max + KEYS - 1) / KEYS * KEYS;
    int32_t *idx = malloc(sizeof(int32_t) * n_max);
    float *buf = malloc(sizeof(float) * (MAX_G + g * n16));
    int64_t n = 0;
    for (int64_t j = 0; j < past; j++) idx[n++] = (int32_t)j;
    for (int64_t j = 0; j <= i; j++)
      if (!mask || mask[i * m + j]) idx[n++] = (int32_t)(past + j);
    attend_task(q + i * q_stride + (int64_t)hk * g * d, kt + hk * nb * KEYS * d, v + hk * cap * d, idx, n, n_max, g,
                d, scale, buf + MAX_G, out + (i * h + (int64_t)hk * g) * d);
    free(idx);
    free(buf);
  }
  free(kt);
  return 0;
}
