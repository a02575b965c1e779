/* int8 x int8 Linear for CPUs with AVX512-VNNI: y = (xq @ wq^T) * x_scale[m] * w_scale[n] + bias[n].
 *
 * Weights: int8, one scale per output channel, packed by `pack` (kernels/int8.py) as
 * [N/32][K/4][32][4]: for each group of 32 output channels and 4 consecutive inputs, 128 bytes, two
 * zmm registers whose 32-bit lanes hold one channel's 4 weights (vpdpbusd's operand layout).
 * Activations: each row quantized to int8 by its own absmax (x_scale = absmax / 127), stored as
 * u8 = q + 128 because vpdpbusd multiplies unsigned by signed bytes; the +128 is taken back out
 * with the per-channel weight sums (colsum), so the int32 sum is exactly sum_k q[k] * w[k].
 *
 * Invariants the engine relies on (bitwise-lossless verification):
 *  - a row's result depends only on that row: quantization is per row, the integer sum is exact,
 *    threads split the output channels (never K), and the float epilogue is the same fixed sequence
 *    of fp32 operations for every row (compiled with -ffp-contract=off: no fused multiply-adds);
 *  - so any M, any row chunking and any thread count give the same bits, and the PyTorch reference
 *    in kernels/int8.py (torch._int_mm + the same epilogue) gives the same bits too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#define ROWS 12 /* rows per register tile: 2 x ROWS int32 accumulators in zmm registers */
#define QUANTIZE_PARALLEL_MIN 32768 /* activation values below which one thread quantizes them all */
#define PREFETCH 4096 /* bytes ahead in the weight stream the AMX loop asks for (tile loads alone stall on DRAM) */

static inline __m512 load16(const void *x, int x_bf16, int64_t i, __mmask16 mask) {
  if (x_bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(mask, (const float *)x + i);
}

/* Per-row absmax quantization of one row of k values (fp32 or bf16):
 * q = clamp(round_half_even(x / scale), -127, 127), scale = max(absmax, 1e-8) / 127, stored as q + 128. */
static void quantize_row(const void *x, int x_bf16, int64_t k, uint8_t *xu, float *scale) {
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x, x_bf16, i, lanes(k - i))));
  const float s = fmaxf(_mm512_reduce_max_ps(vmax), 1e-8f) / 127.f;
  *scale = s;
  const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i off = _mm512_set1_epi32(128);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mask = lanes(k - i);
    __m512 q = _mm512_div_ps(load16(x, x_bf16, i, mask), vs);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(xu + i, mask, _mm512_add_epi32(_mm512_cvtps_epi32(q), off));
  }
}

/* acc (int32, 16 channels from c) -> y row: ((float(acc - 128 colsum) * xs) * wscale) + bias. */
static inline void epilogue16(__m512i acc, int64_t c, int64_t n, const int32_t *colsum, const float *wscale,
                              const float *bias, float xs, void *yrow, int y_bf16) {
  if (c >= n) return;
  const __mmask16 mask = lanes(n - c);
  acc = _mm512_sub_epi32(acc, _mm512_slli_epi32(_mm512_loadu_si512((const void *)(colsum + c)), 7));
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs));
  v = _mm512_mul_ps(v, _mm512_loadu_ps(wscale + c));
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + c));
  if (y_bf16)
    _mm256_mask_storeu_epi16((uint16_t *)yrow + c, mask, to_bf16(v));
  else
    _mm512_mask_storeu_ps((float *)yrow + c, mask, v);
}

/* One tile: `rows` (<= ROWS) rows x 32 channels. Always inlined with a constant `rows` (see
 * `tile_rows`), so the loops unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const uint8_t *xu, int64_t k, int rows, const int8_t *wp, __m512i *acc0, __m512i *acc1) {
#pragma GCC unroll 12
  for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_si512();
  const int64_t k4 = k / 4;
  for (int64_t j = 0; j < k4; j++) {
    const __m512i w0 = _mm512_loadu_si512((const void *)(wp + j * 128));
    const __m512i w1 = _mm512_loadu_si512((const void *)(wp + j * 128 + 64));
#pragma GCC unroll 12
    for (int r = 0; r < rows; r++) {
      int32_t xv;
      memcpy(&xv, xu + r * k + j * 4, 4);
      const __m512i b = _mm512_set1_epi32(xv);
      acc0[r] = _mm512_dpbusd_epi32(acc0[r], b, w0);
      acc1[r] = _mm512_dpbusd_epi32(acc1[r], b, w1);
    }
  }
}

static void tile_rows(const uint8_t *xu, int64_t k, int rows, const int8_t *wp, __m512i *acc0, __m512i *acc1) {
  switch (rows) {
#define TILE(R) \
  case R: tile(xu, k, R, wp, acc0, acc1); break;
    TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
#undef TILE
  }
}

/* AMX: Linux hands out the tile registers only after this request (once per process). */
int w8a8_amx_init(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

struct tilecfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* Tiles: C tmm0/tmm1 (rows 0..15, channels 0..15 / 16..31), tmm2/tmm3 (rows 16..31), A tmm4/tmm5
 * (those rows, 64 inputs), B tmm6/tmm7 (16 channels x 64 inputs, the packed layout's two halves). */
static void amx_config(int m0, int m1) {
  struct tilecfg c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  const int rows[8] = {m0, m0, m1, m1, m0, m1, 16, 16};
  for (int t = 0; t < 8; t++) {
    c.rows[t] = (uint8_t)rows[t];
    c.colsb[t] = rows[t] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

/* Up to 32 rows x 32 channels with AMX into cbuf [32][32] int32; k is a multiple of 64. Same
 * integer sums as `tile` (u8 x s8 products, exact int32 accumulation). */
static void amx_tile(const uint8_t *xu, int64_t k, int m0, int m1, const int8_t *wp, int32_t *cbuf) {
  _tile_zero(0);
  _tile_zero(1);
  if (m1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < k; k0 += 64) {
    const int8_t *b = wp + (k0 / 4) * 128;
    for (int l = 0; l < 2048; l += 64) _mm_prefetch((const char *)b + PREFETCH + l, _MM_HINT_T0);
    _tile_loadd(6, b, 128);
    _tile_loadd(7, b + 64, 128);
    _tile_loadd(4, xu + k0, k);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    if (m1) {
      _tile_loadd(5, xu + 16 * k + k0, k);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 128);
  _tile_stored(1, cbuf + 16, 128);
  if (m1) {
    _tile_stored(2, cbuf + 16 * 32, 128);
    _tile_stored(3, cbuf + 16 * 32 + 16, 128);
  }
}

static void vnni_linear(const uint8_t *xu, const float *xs, int64_t m, int64_t k, const int8_t *wp,
                        const int32_t *colsum, const float *wscale, const float *bias, int64_t n, void *y,
                        int y_bf16, int threads);

/* x: [m, k] fp32 (x_bf16 = 0) or bf16 (x_bf16 = 1); y: [m, n] fp32 or bf16 (y_bf16).
 * wp: packed weights for n_pad = ceil(n / 32) * 32 channels; colsum, wscale, bias: [n_pad] (bias may be NULL).
 * k must be a multiple of 4; with amx (after
 * w8a8_amx_init succeeded) a multiple of 64. */
void w8a8_linear(const void *x, int x_bf16, int64_t m, int64_t k, const int8_t *wp, const int32_t *colsum,
                 const float *wscale, const float *bias, int64_t n, void *y, int y_bf16,
                 int threads, int amx) {
  /* With AMX and more than 32 rows, the rows are padded to a multiple of 32 (u8 128: a zero
   * activation) so that every tile has the same shape: reconfiguring the tiles between a block's
   * full row tiles and its last, shorter one cost more than multiplying the padding. */
  const int64_t mp = amx && m > 32 ? (m + 31) / 32 * 32 : m;
  /* scratch: the quantized rows and their scales (a few KB per row, freed on return) */
  uint8_t *xu = malloc((size_t)(mp * k));
  float *xs = malloc((size_t)m * sizeof(float));
  const int64_t xrow = k * (x_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(m * k >= QUANTIZE_PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < m; r++) quantize_row((const char *)x + r * xrow, x_bf16, k, xu + r * k, xs + r);
  memset(xu + m * k, 128, (size_t)((mp - m) * k));
  const int64_t blocks = (n + 31) / 32;
  const size_t ybytes = y_bf16 ? 2 : 4;
  if (amx) {
#pragma omp parallel num_threads(threads)
    {
      int32_t cbuf[32 * 32] __attribute__((aligned(64)));
      int configured = -1;
#pragma omp for schedule(static)
      for (int64_t nb = 0; nb < blocks; nb++) {
        for (int64_t r0 = 0; r0 < mp; r0 += 32) {
          const int tile_rows = (int)(mp - r0 < 32 ? mp - r0 : 32), rows = (int)(m - r0 < 32 ? m - r0 : 32);
          if (tile_rows != configured) {
            amx_config(tile_rows < 16 ? tile_rows : 16, tile_rows > 16 ? tile_rows - 16 : 0);
            configured = tile_rows;
          }
          amx_tile(xu + r0 * k, k, tile_rows < 16 ? tile_rows : 16, tile_rows > 16 ? tile_rows - 16 : 0,
                   wp + nb * 32 * k, cbuf);
          for (int r = 0; r < rows; r++) {
            void *yrow = (char *)y + (r0 + r) * n * ybytes;
            const __m512i a0 = _mm512_load_si512((const void *)(cbuf + r * 32));
            const __m512i a1 = _mm512_load_si512((const void *)(cbuf + r * 32 + 16));
            epilogue16(a0, nb * 32, n, colsum, wscale, bias, xs[r0 + r], yrow, y_bf16);
            epilogue16(a1, nb * 32 + 16, n, colsum, wscale, bias, xs[r0 + r], yrow, y_bf16);
          }
        }
      }
      if (configured >= 0) _tile_release();
    }
  } else {
    vnni_linear(xu, xs, m, k, wp, colsum, wscale, bias, n, y, y_bf16, threads);
  }
  free(xu);
  free(xs);
}

/* The AVX512-VNNI path: ROWS rows at a time in zmm accumulators. */
static void vnni_linear(const uint8_t *xu, const float *xs, int64_t m, int64_t k, const int8_t *wp,
                        const int32_t *colsum, const float *wscale, const float *bias, int64_t n, void *y,
                        int y_bf16, int threads) {
  const int64_t blocks = (n + 31) / 32;
  const size_t ybytes = y_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t nb = 0; nb < blocks; nb++) {
    __m512i acc0[ROWS], acc1[ROWS];
    const int8_t *wb = wp + nb * 32 * k;
    for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
      const int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);
      tile_rows(xu + r0 * k, k, rows, wb, acc0, acc1);
      for (int r = 0; r < rows; r++) {
        void *yrow = (char *)y + (r0 + r) * n * ybytes;
        epilogue16(acc0[r], nb * 32, n, colsum, wscale, bias, xs[r0 + r], yrow, y_bf16);
        epilogue16(acc1[r], nb * 32 + 16, n, colsum, wscale, bias, xs[r0 + r], yrow, y_bf16);
      }
    }
  }
}
