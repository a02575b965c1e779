/* The int8 x int8 Linear of kernels/cpu/w8a8.c for CPUs with AVX2 but without AVX512-VNNI (AMD Zen
 * 1-3, Intel before Ice Lake): same arguments, same packed weights, same bits.
 *
 * y = (xq @ wq^T) * x_scale[m] * w_scale[n] + bias[n], with xq each row's int8 quantization by its
 * own absmax, exactly as w8a8.c (and kernels/int8.py's reference) computes it.
 *
 * The integer sum: AVX2 has no int8 dot product that is exact (vpmaddubsw saturates its int16 pair
 * sums), so activations and weights are widened to int16 and multiplied with vpmaddwd, whose int32
 * pair sums are exact for int8 inputs (|a b + c d| <= 2 * 127 * 127). The weights stay int8 in
 * memory (the packed layout [N/32][K/4][32][4] of kernels/int8.py `pack`) and are widened in
 * registers, so a decoding step reads one byte per weight. An 8-channel slice of one 4-input step
 * is 32 bytes: widened, two ymm registers of 4 channels x 4 inputs; vpmaddwd against the row's 4
 * inputs (broadcast) leaves each channel's sum in two int32 lanes, added together at the end.
 * Integer addition is exact in any order, so the int32 sums are the VNNI and AMX kernels' own, and
 * the fp32 epilogue is the same sequence of operations (compiled without fused multiply-adds).
 *
 * Invariants (bitwise-lossless verification): a row's result depends only on that row (per-row
 * quantization, exact integer sum, threads split output channels and never K, one fixed epilogue),
 * so any M, any row tiling and any thread count give the same bits.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 6 /* most rows per register tile: 2 x ROWS int32 accumulators in ymm registers (16 ymm in all) */
#define QUANTIZE_PARALLEL_MIN 32768 /* activation values below which one thread quantizes them all */

static inline float load1(const void *x, int x_bf16, int64_t i) {
  if (x_bf16) {
    uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  return ((const float *)x)[i];
}

static inline __m256 load8(const void *x, int x_bf16, int64_t i) {
  if (x_bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps((const float *)x + i);
}

/* Per-row absmax quantization of one row of k values (fp32 or bf16) into int16 lanes:
 * q = clamp(round_half_even(x / scale), -127, 127), scale = max(absmax, 1e-8) / 127. */
static void quantize_row(const void *x, int x_bf16, int64_t k, int16_t *xq, float *scale) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, load8(x, x_bf16, i)));
  float lanes[8], amax = 0.f;
  _mm256_storeu_ps(lanes, vmax);
  for (int l = 0; l < 8; l++) amax = fmaxf(amax, lanes[l]);
  for (int64_t t = i; t < k; t++) amax = fmaxf(amax, fabsf(load1(x, x_bf16, t)));
  const float s = fmaxf(amax, 1e-8f) / 127.f;
  *scale = s;
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (i = 0; i + 8 <= k; i += 8) {
    __m256 q = _mm256_div_ps(load8(x, x_bf16, i), vs);
    q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
    const __m256i v = _mm256_cvtps_epi32(q);
    _mm_storeu_si128((__m128i *)(xq + i), _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  for (; i < k; i++) xq[i] = (int16_t)fminf(fmaxf(nearbyintf(load1(x, x_bf16, i) / s), -127.f), 127.f);
}

/* fp32 -> bf16, round to nearest even (torch's .to(bfloat16)); NaN -> 0x7fc0. */
static inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* Two accumulators of one row (channels c..c+3 and c+4..c+7, each channel's sum split over two
 * adjacent lanes) -> y row: ((float(sum) * xs) * wscale) + bias for channels c .. c+7 below n. */
static inline void epilogue8(__m256i a0, __m256i a1, int64_t c, int64_t n, const float *wscale, const float *bias,
                             float xs, void *yrow, int y_bf16) {
  if (c >= n) return;
  /* hadd within 128-bit halves: [c0 c1 c4 c5 | c2 c3 c6 c7] -> channel order */
  const __m256i acc = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a0, a1), 0xd8);
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(xs));
  v = _mm256_mul_ps(v, _mm256_loadu_ps(wscale + c));  /* wscale is zero-padded to the packed channels */
  float out[8];
  if (bias) {
    float b[8] = {0};
    memcpy(b, bias + c, (size_t)(n - c < 8 ? n - c : 8) * sizeof(float));
    v = _mm256_add_ps(v, _mm256_loadu_ps(b));
  }
  const int64_t left = n - c < 8 ? n - c : 8;
  if (y_bf16) {
    uint16_t h[8];
    _mm_storeu_si128((__m128i *)h, to_bf16(v));
    memcpy((uint16_t *)yrow + c, h, (size_t)left * 2);
  } else if (left == 8) {
    _mm256_storeu_ps((float *)yrow + c, v);
  } else {
    _mm256_storeu_ps(out, v);
    memcpy((float *)yrow + c, out, (size_t)left * 4);
  }
}

/* One tile: `rows` (1-3: the last rows of a batch) rows x 8 channels (the slice at wp of every
 * 128-byte step). Always inlined with a constant `rows`, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const int16_t *xq, int64_t k, int rows, const int8_t *wp,
                                                       __m256i *acc0, __m256i *acc1) {
#pragma GCC unroll 4
  for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm256_setzero_si256();
  const int64_t k4 = k / 4;
  for (int64_t j = 0; j < k4; j++) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + j * 128)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + j * 128 + 16)));
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++) {
      int64_t xv;
      memcpy(&xv, xq + r * k + j * 4, 8);
      const __m256i b = _mm256_set1_epi64x(xv);
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(w0, b));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(w1, b));
    }
  }
}

/* A written-out tile's step j: the slice's two widened weight registers (4 channels x 4 inputs
 * each), then per row its 4 inputs broadcast and both products added in place. */
#define WEIGHTS                                                                                      \
  const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + j * 128)));      \
  const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + j * 128 + 16))); \
  int64_t v;                                                                                         \
  __m256i c;
#define ROW(x, a, b)                                    \
  memcpy(&v, (x) + j * 4, 8);                           \
  c = _mm256_set1_epi64x(v);                            \
  a = _mm256_add_epi32(a, _mm256_madd_epi16(w0, c));    \
  b = _mm256_add_epi32(b, _mm256_madd_epi16(w1, c));

/* Four rows x 8 channels, written out: GCC keeps these eight accumulators in registers and adds in
 * place. Through the generic `tile` (arrays indexed by row) it copied a register after every add
 * and spilled one per step, and the loop ran at about a third of vpmaddwd's rate, bound by
 * instruction issue. */
static __attribute__((noinline)) void tile4(const int16_t *xq, int64_t k, const int8_t *wp, __m256i *acc0, __m256i *acc1) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  const int64_t k4 = k / 4;
#pragma GCC unroll 2
  for (int64_t j = 0; j < k4; j++) {
    WEIGHTS
    ROW(xq, a0, b0) ROW(xq + k, a1, b1) ROW(xq + 2 * k, a2, b2) ROW(xq + 3 * k, a3, b3)
  }
  acc0[0] = a0, acc0[1] = a1, acc0[2] = a2, acc0[3] = a3;
  acc1[0] = b0, acc1[1] = b1, acc1[2] = b2, acc1[3] = b3;
}

/* Six rows x 8 channels, the same way: 12 accumulators, 2 widened weight registers, 1 broadcast;
 * each widened weight register feeds six products instead of four. */
static __attribute__((noinline)) void tile6(const int16_t *xq, int64_t k, const int8_t *wp, __m256i *acc0, __m256i *acc1) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  const int64_t k4 = k / 4;
#pragma GCC unroll 2
  for (int64_t j = 0; j < k4; j++) {
    WEIGHTS
    ROW(xq, a0, b0) ROW(xq + k, a1, b1) ROW(xq + 2 * k, a2, b2)
    ROW(xq + 3 * k, a3, b3) ROW(xq + 4 * k, a4, b4) ROW(xq + 5 * k, a5, b5)
  }
  acc0[0] = a0, acc0[1] = a1, acc0[2] = a2, acc0[3] = a3, acc0[4] = a4, acc0[5] = a5;
  acc1[0] = b0, acc1[1] = b1, acc1[2] = b2, acc1[3] = b3, acc1[4] = b4, acc1[5] = b5;
}
#undef ROW
#undef WEIGHTS

static void tile_rows(const int16_t *xq, int64_t k, int rows, const int8_t *wp, __m256i *acc0, __m256i *acc1) {
  switch (rows) {
#define TILE(R) \
  case R: tile(xq, k, R, wp, acc0, acc1); break;
    TILE(1) TILE(2) TILE(3)
#undef TILE
    case 4: tile4(xq, k, wp, acc0, acc1); break;
    case 6: tile6(xq, k, wp, acc0, acc1); break;
  }
}

/* One row x a whole block of 32 channels: the block's 128 bytes per 4-input step read in order
 * (a decoding step is bound by the weight stream, and sequential reads keep it at full speed);
 * acc[2 s], acc[2 s + 1] are slice s's accumulators, as `tile` leaves them. */
static void row_block(const int16_t *xq, int64_t k, const int8_t *wp, __m256i *acc) {
  for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
  const int64_t k4 = k / 4;
  for (int64_t j = 0; j < k4; j++) {
    int64_t xv;
    memcpy(&xv, xq + j * 4, 8);
    const __m256i b = _mm256_set1_epi64x(xv);
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + j * 128 + i * 16)));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(w, b));
    }
  }
}

/* The signature of w8a8.c's w8a8_linear (colsum and amx unused: the activations are signed here). */
void w8a8_linear(const void *x, int x_bf16, int64_t m, int64_t k, const int8_t *wp, const int32_t *colsum,
                 const float *wscale, const float *bias, int64_t n, void *y, int y_bf16, int threads, int amx) {
  (void)colsum;
  (void)amx;
  int16_t *xq = malloc((size_t)(m * k) * sizeof(int16_t));
  float *xs = malloc((size_t)m * sizeof(float));
  const int64_t xrow = k * (x_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(m * k >= QUANTIZE_PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < m; r++) quantize_row((const char *)x + r * xrow, x_bf16, k, xq + r * k, xs + r);
  const int64_t slices = (n + 7) / 8; /* 8-channel slices; slice s sits in block s / 4 at byte 32 (s % 4) */
  const size_t ybytes = y_bf16 ? 2 : 4;
  if (m == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t nb = 0; nb < (n + 31) / 32; nb++) {
      __m256i acc[8];
      row_block(xq, k, wp + nb * 32 * k, acc);
      for (int sl = 0; sl < 4; sl++) epilogue8(acc[2 * sl], acc[2 * sl + 1], nb * 32 + sl * 8, n, wscale, bias, xs[0], y, y_bf16);
    }
    free(xq);
    free(xs);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t s = 0; s < slices; s++) {
    __m256i acc0[ROWS], acc1[ROWS];
    const int8_t *wb = wp + (s / 4) * 32 * k + (s % 4) * 32;
    for (int64_t r0 = 0, rows; r0 < m; r0 += rows) {
      rows = m - r0 >= 6 ? 6 : m - r0 >= 4 ? 4 : m - r0; /* six-row tiles, then four, then the generic tile */
      tile_rows(xq + r0 * k, k, rows, wb, acc0, acc1);
      for (int r = 0; r < rows; r++)
        epilogue8(acc0[r], acc1[r], s * 8, n, wscale, bias, xs[r0 + r], (char *)y + (r0 + r) * n * ybytes, y_bf16);
    }
  }
  free(xq);
  free(xs);
}
