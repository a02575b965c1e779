/* One decoder layer's work around attention, for int8 Linears on bf16 rows, in two calls: each
 * PyTorch-side op costs tens of microseconds once the weight stream has evicted the interpreter
 * from the caches, so a layer runs as `layer_attn_in` (RMSNorm, q/k/v, rotary) and `layer_mlp`
 * (o_proj, residual add, RMSNorm, gate/up, SiLU * up, down_proj), the attention between them.
 *
 * The calls run the very functions the step-by-step path runs (w8a8_linear, add_rms_norm, rope,
 * silu_mul), in the same order on the same values, so they give the same bits; every step is
 * row-wise (see those functions), so the layer is too.
 *
 * A Linear is described by six int64 values (kernels/int8.py, `descriptor`): packed weights,
 * column sums, scales and bias (0: none) as addresses, then out and in features.
 */
#include <stdint.h>
#include <stdlib.h>

void w8a8_linear(const void *x, int x_bf16, int64_t m, int64_t k, const int8_t *wp, const int32_t *colsum,
                 const float *wscale, const float *bias, int64_t n, void *y, int y_bf16, int threads, int amx);
void add_rms_norm(const uint16_t *h, int64_t h_stride, const uint16_t *delta, int64_t delta_stride, uint16_t *sum,
                  int64_t rows, int64_t d, const uint16_t *w, float eps, uint16_t *out, int threads);
void rope(uint16_t *x, int64_t x_stride, int64_t rows, int heads, int64_t d, const uint16_t *cos_, const uint16_t *sin_,
          int threads);
void silu_mul(const uint16_t *g, int64_t g_stride, const uint16_t *u, int64_t u_stride, int64_t rows, int64_t d,
              uint16_t *out, int64_t out_stride, int threads);
void hadamard16(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t d, uint16_t *out, int64_t out_stride,
                int threads);

static void linear(const int64_t *w, const uint16_t *x, int64_t m, uint16_t *y, int threads, int amx) {
  const int64_t n = w[4], k = w[5];
  w8a8_linear(x, 1, m, k, (const int8_t *)w[0], (const int32_t *)w[1], (const float *)w[2], (const float *)w[3], n, y,
              1, threads, amx && k % 64 == 0);
}

/* h_sum = h + delta (delta NULL: h_sum untouched, h used), x = RMSNorm(h_sum) * norm_w,
 * qkv = x @ [Wq; Wk; Wv] (+ bias), then rotary on its q and k heads in place.
 * h, delta, h_sum: [m, hidden]; qkv: [m, (nh + 2 nkv) d]; cos, sin: [m, d]. */
void layer_attn_in(const uint16_t *h, const uint16_t *delta, uint16_t *h_sum, int64_t m, int64_t hidden,
                   const uint16_t *norm_w, float eps, const int64_t *qkv_w, const uint16_t *cos_, const uint16_t *sin_,
                   int nh, int nkv, int d, uint16_t *qkv, int threads, int amx) {
  uint16_t *x = malloc((size_t)(m * hidden) * 2);
  add_rms_norm(h, hidden, delta, hidden, delta ? h_sum : NULL, m, hidden, norm_w, eps, x, threads);
  linear(qkv_w, x, m, qkv, threads, amx);
  const int64_t stride = (int64_t)(nh + 2 * nkv) * d;
  rope(qkv, stride, m, nh, d, cos_, sin_, threads);
  rope(qkv + (int64_t)nh * d, stride, m, nkv, d, cos_, sin_, threads);
  free(x);
}

/* h_sum = h + attn @ Wo, x = RMSNorm(h_sum) * norm_w, delta = (SiLU(x @ Wg) * (x @ Wu)) @ Wd, with
 * down_hadamard: the SiLU product goes through `hadamard16` first (Wd then holds the rotated weight).
 * h, h_sum, delta: [m, hidden]; attn: [m, o_w's in features]; gate_up_w: gate's channels, then up's. */
void layer_mlp(const uint16_t *h, const uint16_t *attn, uint16_t *h_sum, int64_t m, int64_t hidden, const int64_t *o_w,
               const uint16_t *norm_w, float eps, const int64_t *gate_up_w, const int64_t *down_w, int down_hadamard,
               uint16_t *delta, int threads, int amx) {
  const int64_t inter = gate_up_w[4] / 2;
  uint16_t *o = malloc((size_t)(m * hidden) * 2), *x = malloc((size_t)(m * hidden) * 2);
  uint16_t *gu = malloc((size_t)(m * 2 * inter) * 2), *a = malloc((size_t)(m * inter) * 2);
  linear(o_w, attn, m, o, threads, amx);
  add_rms_norm(h, hidden, o, hidden, h_sum, m, hidden, norm_w, eps, x, threads);
  linear(gate_up_w, x, m, gu, threads, amx);
  silu_mul(gu, 2 * inter, gu + inter, 2 * inter, m, inter, a, inter, threads);
  if (down_hadamard)
    hadamard16(a, inter, m, inter, a, inter, threads);
  linear(down_w, a, m, delta, threads, amx);
  free(o);
  free(x);
  free(gu);
  free(a);
}
