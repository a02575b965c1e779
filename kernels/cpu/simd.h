/* AVX512 helpers shared by the CPU kernels: bf16 <-> fp32 and e^x, each a fixed instruction
 * sequence (results depend on the inputs alone). */
#pragma once
#include <immintrin.h>
#include <stdint.h>

/* Lanes 0 .. left - 1 of a 16-lane mask. */
static inline __mmask16 lanes(int64_t left) { return left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }

/* 16 bf16 values (masked lanes read as 0) -> fp32, exactly. */
static inline __m512 bf16x16(const uint16_t *p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* fp32 -> bf16, round to nearest even (torch's .to(bfloat16)); NaN -> 0x7fc0. */
static inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

static inline void store_bf16x16(uint16_t *p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

/* e^x: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the Taylor polynomial of `degree` (7:
 * relative error ~1e-7; 5: ~2e-6, enough for values rounded to bf16 next); x is clamped to
 * [-87, 88], and below -87 the result is 0 (softmax tails). Inlined with a constant degree. */
static inline __attribute__((always_inline)) __m512 exp_poly_ps(__m512 x, int degree) {
  static const float inv_factorial[8] = {1.f, 1.f, 0.5f, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720, 1.f / 5040};
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(inv_factorial[degree]);
  for (int k = degree - 1; k >= 0; k--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inv_factorial[k]));
  return _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
}

static inline __m512 exp_ps(__m512 x) { return exp_poly_ps(x, 7); }
