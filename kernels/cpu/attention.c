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
 *
 * Two paths with those invariants and other bits: AVX512 fp32 FMAs (below), and on CPUs with
 * AMX-BF16 tile products (`attend_task_amx`), which the caller picks once per process.
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

/* ---- AMX-BF16 path: the same contract, with tile matrix multiplies for both products ----
 *
 * Per task, one tree row or two chain rows of one kv head, their g query heads as the rows of a
 * 16-row tile (rows past them are zero and ignored): S = Q K^T in 16-key tiles (tdpbf16ps: exact
 * bf16 products, fp32 sums over the D channels), scaled; the softmax in fp32 over the visible
 * keys (e^x to a degree-5 polynomial: the weights are rounded to bf16 next, and the normalizer
 * sums the rounded weights) and O = P V in 32-key steps. Every output element depends on its own
 * query head's row of Q or P and on the keys alone, and key j of the visible list always sits in
 * slot j of the tiles (keys past the list: weight 0, and a zero value where the list ends in the
 * same tile for a row decoded alone), so a verify or tree row gets the bits of decoding it alone. Keys and values are packed into the tiles' operand layout (B rows
 * of 16 dwords, a dword = two consecutive K-dim values): by `attend_batch` into the sessions'
 * packed copies of their caches (only the positions not packed yet, and always those from the
 * call's first row on), by `attend_rows` into scratch, all of them, every call. */

/* Grow-only scratch, one set per thread: a call's buffers are ~ the cache's size, and fresh
 * allocations of that size come back from the OS as new pages to fault in on every call. */
enum { SCRATCH_KT, SCRATCH_VN, SCRATCH_IDX, SCRATCH_SCORES, SCRATCH_P, SCRATCH_TAIL, SCRATCH_N };
static __thread void *scratch_buf[SCRATCH_N];
static __thread size_t scratch_size[SCRATCH_N];

static void *scratch(int which, size_t bytes) {
  if (bytes > scratch_size[which]) {
    free(scratch_buf[which]);
    scratch_buf[which] = malloc(bytes + bytes / 2);
    scratch_size[which] = bytes + bytes / 2;
  }
  return scratch_buf[which];
}

#define VKEYS 32 /* keys per P V step: the K dimension of one bf16 tile multiply */

static void amx_config16(void) { /* all eight tiles 16 rows x 64 bytes */
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

/* 16 x 16 dword transpose in registers: r[i] lane j -> r[j] lane i. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  /* u[4i + j], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + j */
  for (int j = 0; j < 4; j++) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), x1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xee);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), y1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xee);
    r[j] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(x0, y0, 0xdd);
    r[8 + j] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(x1, y1, 0xdd);
  }
}

/* K^T as B operands for the KEYS-key block b of one kv head (keys: its cache rows):
 * kt[(s * 16 + p) * 16 + t] = the dword of channels 32 s + 2 p, 32 s + 2 p + 1 of key b * 16 + t
 * (0 for keys >= n). */
static void amx_pack_keys_block(const uint16_t *k, int d, int64_t n, int64_t b, uint32_t *kt) {
  for (int s = 0; s < d / 32; s++) {
    __m512i r[16];
    for (int t = 0; t < 16; t++)
      r[t] = _mm512_maskz_loadu_epi32(b * KEYS + t < n ? 0xffff : 0, k + (b * KEYS + t) * d + 32 * s);
    transpose16(r);
    for (int p = 0; p < 16; p++) _mm512_storeu_si512((void *)(kt + (s * 16 + p) * 16), r[p]);
  }
}

/* V as B operands for the VKEYS-key block b, its key slots j filled from cache rows
 * idx ? idx[j] : j for j < n, else 0: vn[(c * 16 + p) * 32 + 2 x + e] = channel 16 c + x of slot
 * b * 32 + 2 p + e (one 16-row tile per 16 channels c). */
static void amx_pack_values_block(const uint16_t *v, int d, const int32_t *idx, int64_t n, int64_t b, uint16_t *vn) {
  static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                      8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_loadu_si512((const void *)lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int p = 0; p < 16; p++) {
    const int64_t j0 = b * VKEYS + 2 * p, j1 = j0 + 1;
    const uint16_t *r0 = v + (int64_t)(j0 < n ? (idx ? idx[j0] : j0) : 0) * d;
    const uint16_t *r1 = v + (int64_t)(j1 < n ? (idx ? idx[j1] : j1) : 0) * d;
    for (int x = 0; x < d / 32; x++) {
      const __m512i a = _mm512_maskz_loadu_epi16(j0 < n ? ~0u : 0, r0 + 32 * x);
      const __m512i c = _mm512_maskz_loadu_epi16(j1 < n ? ~0u : 0, r1 + 32 * x);
      _mm512_storeu_si512((void *)(vn + ((2 * x) * 16 + p) * 32), _mm512_permutex2var_epi16(a, lo, c));
      _mm512_storeu_si512((void *)(vn + ((2 * x + 1) * 16 + p) * 32), _mm512_permutex2var_epi16(a, hi, c));
    }
  }
}

/* VKEYS block b of kv head hk: its keys (two KEYS blocks) and values as B operands (kt, vn: `blocks`
 * VKEYS blocks per kv head). */
static void amx_pack_block(const uint16_t *k, const uint16_t *v, int64_t cap, int d, int64_t n, int64_t hk, int64_t b,
                           int64_t blocks, uint32_t *kt, uint16_t *vn) {
  const uint16_t *kh = k + hk * cap * d, *vh = v + hk * cap * d;
  uint32_t *kth = kt + hk * blocks * VKEYS * d / 2;
  amx_pack_keys_block(kh, d, n, 2 * b, kth + 2 * b * KEYS * d / 2);
  amx_pack_keys_block(kh, d, n, 2 * b + 1, kth + (2 * b + 1) * KEYS * d / 2);
  amx_pack_values_block(vh, d, NULL, n, b, vn + (hk * blocks + b) * VKEYS * d);
}

/* Keys and values 0 .. n - 1 of every kv head as B operands, from VKEYS block `from` on (the
 * blocks below are packed already): kt, vn hold `blocks` VKEYS blocks per kv head. */
static void amx_pack(const uint16_t *k, const uint16_t *v, int64_t cap, int kv, int d, int64_t from, int64_t n,
                     int64_t blocks, uint32_t *kt, uint16_t *vn, int threads) {
  const int64_t nv = (n + VKEYS - 1) / VKEYS, todo = nv - from;
  if (todo <= 0) return;
#pragma omp parallel for schedule(static) num_threads(kv * todo * d >= 8192 ? threads : 1)
  for (int64_t task = 0; task < kv * todo; task++)
    amx_pack_block(k, v, cap, d, n, task / todo, from + task % todo, blocks, kt, vn);
}

/* One task: `nq` (1 or 2) query rows of one kv head, their g heads each as rows a * g + h of the
 * tiles (2 g <= 16 when nq = 2). Row a sees keys 0 .. n[a] - 1 in slot order, its output goes to
 * out[a] (g heads x d). idx (nq = 1 only, else NULL): the row's visible keys when they are not
 * slots 0 .. n - 1 (a tree row), below n_full (the scores are computed for keys below n_full,
 * then moved to their slots). kt, vn: this kv head's packed keys and values; tail: NULL, or the
 * row's own packed value blocks from `base` on (a tree row). scores: 16 x (n_full rounded up to
 * KEYS) + VKEYS floats; pw: 16 x (max n rounded up to VKEYS) bf16. */
static void attend_task_amx(const uint16_t *const *q, uint16_t *const *out, const int64_t *n, int nq,
                            const uint32_t *kt, const uint16_t *vn, const int32_t *idx, int64_t n_full, int64_t base,
                            const uint16_t *tail, int g, int d, float scale, float *scores, uint16_t *pw) {
  const int ds = d / 32, dc = d / 16;
  const int64_t n_max = nq == 2 && n[1] > n[0] ? n[1] : n[0];
  const int64_t n16 = (n_full + KEYS - 1) / KEYS * KEYS, n32 = (n_max + VKEYS - 1) / VKEYS * VKEYS;
  uint16_t qa[16 * MAX_D] __attribute__((aligned(64)));
  memset(qa, 0, sizeof(uint16_t) * 16 * d);
  for (int a = 0; a < nq; a++) memcpy(qa + a * g * d, q[a], sizeof(uint16_t) * g * d);
  /* S rows a g + h, keys b * 16 .. + 15: two key blocks at a time into C tiles 0 and 3, so one
   * block's multiplies overlap the other's (each block's sum over s is the same sequence either way). */
  const int64_t blocks = n16 / KEYS;
  if (ds <= 2) {
    _tile_loadd(1, qa, d * 2);
    if (ds == 2) _tile_loadd(2, qa + 32, d * 2);
  }
  for (int64_t b = 0; b < blocks; b += 2) {
    const int two = b + 1 < blocks;
    _tile_zero(0);
    if (two) _tile_zero(3);
    for (int s = 0; s < ds; s++) {
      if (ds > 2) _tile_loadd(1, qa + 32 * s, d * 2);
      _tile_loadd(4, kt + (b * ds + s) * 256, 64);
      if (two) _tile_loadd(5, kt + ((b + 1) * ds + s) * 256, 64);
      if (s == 1 && ds == 2) {
        _tile_dpbf16ps(0, 2, 4);
        if (two) _tile_dpbf16ps(3, 2, 5);
      } else {
        _tile_dpbf16ps(0, 1, 4);
        if (two) _tile_dpbf16ps(3, 1, 5);
      }
    }
    _tile_stored(0, scores + b * KEYS, n16 * 4);
    if (two) _tile_stored(3, scores + (b + 1) * KEYS, n16 * 4);
  }
  if (idx && n[0] < n_full)
    for (int h = 0; h < g; h++)
      for (int64_t j = 0; j < n[0]; j++) scores[h * n16 + j] = scores[h * n16 + idx[j]]; /* idx[j] >= j */
  float inv[16];
  const __m512 vscale = _mm512_set1_ps(scale);
  memset(pw + nq * g * n32, 0, sizeof(uint16_t) * (16 - nq * g) * n32);
  for (int row = 0; row < nq * g; row++) { /* weights, rounded to bf16, into P's row; slots past n -> 0 */
    const int64_t nr = n[row / g];
    float *s = scores + row * n16;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < nr; j += KEYS) {
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale);
      _mm512_storeu_ps(s + j, x);
      vmx = _mm512_mask_max_ps(vmx, lanes(nr - j), vmx, x);
    }
    vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n32; j += KEYS) {
      const __mmask16 live = lanes(nr - j);
      const __m512 e = exp_poly_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), vmx), 5);
      const __m256i pb = _mm256_maskz_mov_epi16(live, (__m256i)_mm512_cvtneps_pbh(e));
      _mm256_storeu_si256((__m256i *)(pw + row * n32 + j), pb);
      vsum = _mm512_add_ps(vsum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pb), 16)));
    }
    inv[row] = 1.f / _mm512_reduce_add_ps(vsum);
  }
  float acc[16 * 64] __attribute__((aligned(64)));
  for (int c0 = 0; c0 < dc; c0 += 4) { /* 64 output channels a pass: four C tiles */
    const int cs = dc - c0 < 4 ? dc - c0 : 4;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t b = 0; b < n32 / VKEYS; b++) {
      const uint16_t *vb = tail && b * VKEYS >= base ? tail + (b - base / VKEYS) * dc * 512 : vn + b * dc * 512;
      _tile_loadd(0, pw + b * VKEYS, n32 * 2);
      _tile_loadd(1, vb + (c0 + 0) * 512, 64);
      _tile_dpbf16ps(4, 0, 1);
      if (cs > 1) { _tile_loadd(1, vb + (c0 + 1) * 512, 64); _tile_dpbf16ps(5, 0, 1); }
      if (cs > 2) { _tile_loadd(1, vb + (c0 + 2) * 512, 64); _tile_dpbf16ps(6, 0, 1); }
      if (cs > 3) { _tile_loadd(1, vb + (c0 + 3) * 512, 64); _tile_dpbf16ps(7, 0, 1); }
    }
    _tile_stored(4, acc, 256);
    _tile_stored(5, acc + 16, 256);
    _tile_stored(6, acc + 32, 256);
    _tile_stored(7, acc + 48, 256);
    for (int row = 0; row < nq * g; row++)
      for (int c = 0; c < cs; c++)
        _mm256_storeu_si256((__m256i *)(out[row / g] + (int64_t)(row % g) * d + 16 * (c0 + c)),
                            to_bf16(_mm512_mul_ps(_mm512_load_ps(acc + row * 64 + 16 * c), _mm512_set1_ps(inv[row]))));
  }
}

/* Row i's visible keys (cache positions) into idx, in order; returns their number. */
static int64_t visible_keys(int64_t past, int64_t m, int64_t i, const uint8_t *mask, int32_t *idx) {
  int64_t n = 0;
  for (int64_t j = 0; j < past; j++) idx[n++] = (int32_t)j;
  for (int64_t j = 0; j <= i; j++)
    if (!mask || mask[i * m + j]) idx[n++] = (int32_t)(past + j);
  return n;
}

/* One sequence's rows in a forward (see `attend_rows` for the shapes). */
struct seq {
  const uint16_t *q, *k_new, *v_new;
  int64_t q_stride, new_stride;
  uint16_t *k, *v;
  int64_t cap, past, m;
  const uint8_t *mask;
  uint16_t *out;
};

/* The call's own keys and values into the cache at past .. past + M - 1. */
static void write_new(const struct seq *s, int kv, int d) {
  if (!s->k_new) return;
  for (int64_t i = 0; i < s->m; i++)
    for (int hk = 0; hk < kv; hk++) {
      memcpy(s->k + (hk * s->cap + s->past + i) * d, s->k_new + i * s->new_stride + (int64_t)hk * d, (size_t)d * 2);
      memcpy(s->v + (hk * s->cap + s->past + i) * d, s->v_new + i * s->new_stride + (int64_t)hk * d, (size_t)d * 2);
    }
}

/* AMX tasks of a sequence: chain rows go two to a task where their heads fit one tile (a row's bits
 * do not depend on the other rows of its tile), tree rows one to a task; r rows, t of kv * groups. */
static int rows_per_task(const struct seq *s, int g) { return !s->mask && 2 * g <= 16 ? 2 : 1; }
static int64_t amx_tasks(const struct seq *s, int g, int kv, int64_t r) {
  const int per = rows_per_task(s, g);
  return (r + per - 1) / per * kv;
}

/* AMX task t of a sequence (0 <= t < amx_tasks): kt, vn its packed keys and values, nv VKEYS blocks
 * per kv head; rows: the r row indices computed (NULL: all M). */
static void amx_task(const struct seq *s, int64_t t, const int32_t *rows, int64_t r, int g, int kv, int d, float scale,
                     const uint32_t *kt, const uint16_t *vn, int64_t nv) {
  const int per = rows_per_task(s, g), dc = d / 16, h = g * kv;
  const int64_t grp = t / kv;
  const int hk = (int)(t % kv), nq = grp * per + per <= r ? per : (int)(r - grp * per);
  const uint16_t *qs[2];
  uint16_t *os[2];
  int64_t ns[2] = {0, 0};
  for (int a = 0; a < nq; a++) {
    const int64_t i = rows ? rows[grp * per + a] : grp * per + a;
    qs[a] = s->q + i * s->q_stride + (int64_t)hk * g * d;
    os[a] = s->out + (i * h + (int64_t)hk * g) * d;
    ns[a] = s->past + i + 1;
  }
  const int64_t n_full = nq == 2 && ns[1] > ns[0] ? ns[1] : ns[0];
  const int64_t n16 = (n_full + KEYS - 1) / KEYS * KEYS, n32 = (n_full + VKEYS - 1) / VKEYS * VKEYS;
  float *scores = scratch(SCRATCH_SCORES, sizeof(float) * (16 * n16 + VKEYS));
  uint16_t *pw = scratch(SCRATCH_P, sizeof(uint16_t) * 16 * n32);
  const int64_t base = s->past / VKEYS * VKEYS;
  int32_t *idx = NULL;
  uint16_t *tail = NULL;
  if (s->mask) { /* a tree row: its visible keys, and its value slots from `base` on packed from them */
    const int64_t i = rows ? rows[grp] : grp;
    idx = scratch(SCRATCH_IDX, sizeof(int32_t) * n_full);
    ns[0] = visible_keys(s->past, s->m, i, s->mask, idx);
    tail = scratch(SCRATCH_TAIL, sizeof(uint16_t) * (size_t)((n32 - base) * d));
    for (int64_t b = base / VKEYS; b < n32 / VKEYS; b++)
      amx_pack_values_block(s->v + hk * s->cap * d, d, idx, ns[0], b, tail + (b - base / VKEYS) * dc * 512);
  }
  attend_task_amx(qs, os, ns, nq, kt + hk * nv * VKEYS * d / 2, vn + hk * nv * VKEYS * d, idx, n_full, base, tail, g,
                  d, scale, scores, pw);
}

static int shape_ok(int h, int kv, int d) {
  const int g = h / kv;
  return !(d % 16 || d > MAX_D || g > MAX_G || g * kv != h);
}

/* q: [M, H, D] bf16 at row stride q_stride (elements); out: [M, H, D] contiguous. k, v: [KV, cap, D]
 * bf16, this sequence's cache. k_new, v_new (or NULL): the call's own rows, [M, KV, D] at row
 * stride new_stride, first written to the cache at past .. past + M - 1 (else already there).
 * mask: [M, M] uint8 or NULL (causal). rows: the r row indices to compute, or NULL for all M (r
 * ignored); others are left untouched. The AMX path packs what it reads into scratch (a session's
 * packed copy of its cache: `attend_batch`). Returns 0, or -1 for a shape it does not take. */
int attend_rows(const uint16_t *q, int64_t q_stride, const uint16_t *k_new, const uint16_t *v_new, int64_t new_stride,
                uint16_t *k, uint16_t *v, int64_t cap, int64_t past, int64_t m, int h, int kv, int d, float scale,
                const uint8_t *mask, const int32_t *rows, int64_t r, uint16_t *out, int threads, int amx) {
  const int g = h / kv;
  if (!shape_ok(h, kv, d)) return -1;
  const struct seq s = {q, k_new, v_new, q_stride, new_stride, k, v, cap, past, m, mask, out};
  write_new(&s, kv, d);
  if (!rows) r = m;
  amx = amx && d % 32 == 0;
  const int64_t n_all = past + m, nb = (n_all + KEYS - 1) / KEYS;
  void *kt;
  uint16_t *vn = NULL;
  int64_t nv = 0; /* VKEYS blocks per kv head in kt, vn */
  if (amx) {
    nv = (n_all + VKEYS - 1) / VKEYS;
    kt = scratch(SCRATCH_KT, sizeof(uint16_t) * (size_t)(kv * nv * VKEYS * d));
    vn = scratch(SCRATCH_VN, sizeof(uint16_t) * (size_t)(kv * nv * VKEYS * d));
    amx_pack(k, v, cap, kv, d, 0, n_all, nv, kt, vn, threads);
  } else {
    kt = scratch(SCRATCH_KT, sizeof(uint16_t) * (size_t)(kv * nb * KEYS * d));
    transpose_keys(k, cap, kv, d, n_all, kt, threads);
  }
  if (!amx) {
    const int64_t tasks = r * kv;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; t++) {
      const int64_t i = rows ? rows[t / kv] : t / kv;
      const int hk = (int)(t % kv);
      const int64_t n_max = past + i + 1;
      int32_t *idx = scratch(SCRATCH_IDX, sizeof(int32_t) * n_max);
      const int64_t n = visible_keys(past, m, i, mask, idx);
      float *buf = scratch(SCRATCH_SCORES, sizeof(float) * (MAX_G + g * ((n_max + KEYS - 1) / KEYS * KEYS)));
      attend_task(q + i * q_stride + (int64_t)hk * g * d, (const uint16_t *)kt + hk * nb * KEYS * d,
                  v + hk * cap * d, idx, n, n_max, g, d, scale, buf + MAX_G, out + (i * h + (int64_t)hk * g) * d);
    }
    return 0;
  }
  const int64_t tasks = amx_tasks(&s, g, kv, r);
#pragma omp parallel num_threads(threads)
  {
    amx_config16();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; t++) amx_task(&s, t, rows, r, g, kv, d, scale, kt, vn, nv);
    _tile_release();
  }
  return 0;
}

#define SEQ_FIELDS 15

/* Every row of several sequences (one forward's, one layer) on the AMX path with their sessions'
 * packed caches, in one parallel region: the same tasks `attend_rows` runs for each (so the same
 * bits), packing first, then all sequences' tasks shared out between the threads. desc: nseq x
 * SEQ_FIELDS int64, per sequence attend_rows's q, q_stride, k_new, v_new, new_stride, k, v, cap,
 * past, m, mask, out, then the session's packed keys and values and the address of its count of
 * positions packed, which the call repacks from min(count, past) on and sets to past + M (the
 * pointers as integers; k_new, v_new and mask may be 0).
 * Returns 0, or -1 for a shape it does not take (then nothing is written). */
int attend_batch(int64_t nseq, const int64_t *desc, int h, int kv, int d, float scale, int threads) {
  if (!shape_ok(h, kv, d) || d % 32) return -1;
  const int g = h / kv;
  struct seq *ss = malloc(sizeof(struct seq) * (size_t)nseq);
  int64_t *pack_end = malloc(sizeof(int64_t) * (size_t)(3 * nseq)), *from = pack_end + nseq, *task_end = from + nseq;
  int64_t packs = 0, tasks = 0;
  for (int64_t i = 0; i < nseq; i++) {
    const int64_t *f = desc + i * SEQ_FIELDS;
    ss[i] = (struct seq){(const uint16_t *)f[0], (const uint16_t *)f[2], (const uint16_t *)f[3], f[1], f[4],
                         (uint16_t *)f[5], (uint16_t *)f[6], f[7], f[8], f[9], (const uint8_t *)f[10], (uint16_t *)f[11]};
    write_new(&ss[i], kv, d);
    const int64_t count = *(const int64_t *)f[14], upto = count < ss[i].past ? count : ss[i].past;
    from[i] = upto / VKEYS;
    packs += kv * ((ss[i].past + ss[i].m + VKEYS - 1) / VKEYS - from[i]);
    pack_end[i] = packs;
    tasks += amx_tasks(&ss[i], g, kv, ss[i].m);
    task_end[i] = tasks;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < packs; t++) { /* one VKEYS block of one kv head of one sequence */
      int64_t i = 0;
      while (t >= pack_end[i]) i++;
      const struct seq *s = &ss[i];
      const int64_t *f = desc + i * SEQ_FIELDS, first = i ? pack_end[i - 1] : 0, todo = (pack_end[i] - first) / kv;
      amx_pack_block(s->k, s->v, s->cap, d, s->past + s->m, (t - first) / todo, from[i] + (t - first) % todo,
                     (s->cap + VKEYS - 1) / VKEYS, (uint32_t *)f[12], (uint16_t *)f[13]);
    }
    amx_config16();
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; t++) {
      int64_t i = 0;
      while (t >= task_end[i]) i++;
      const int64_t *f = desc + i * SEQ_FIELDS;
      amx_task(&ss[i], t - (i ? task_end[i - 1] : 0), NULL, ss[i].m, g, kv, d, scale, (const uint32_t *)f[12],
               (const uint16_t *)f[13], (ss[i].cap + VKEYS - 1) / VKEYS);
    }
    _tile_release();
  }
  for (int64_t i = 0; i < nseq; i++) *(int64_t *)desc[i * SEQ_FIELDS + 14] = ss[i].past + ss[i].m;
  free(ss);
  free(pack_end);
  return 0;
}
