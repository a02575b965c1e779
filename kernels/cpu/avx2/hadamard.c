/* The 16-point Hadamard rotation of fp32 rows (kernels/rowops.py `hadamard16_reference`) for the
 * int8 down_proj's input on CPUs without the AVX512 row kernels, where activations are fp32.
 *
 * Same bits as the reference: per block of 16 channels, butterfly stages h = 1, 2, 4, 8 turn
 * channels i and i + h of each 2h-group into (a + b, a - b), then every channel is scaled by 1/4
 * (exact). Each output is the same fp32 additions in the same order (no reassociation, no fused
 * operations: the library is built with -ffp-contract=off), so the result does not depend on the
 * vector width the compiler picks, on the batch or on the thread count. */
#include <stdint.h>

#define PARALLEL_MIN 32768 /* values below which one thread rotates them all */

static inline void block16(const float *x, float *y) {
  float v[16];
  for (int i = 0; i < 16; i++) v[i] = x[i];
  for (int h = 1; h < 16; h *= 2)
    for (int g = 0; g < 16; g += 2 * h)
      for (int i = g; i < g + h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
  for (int i = 0; i < 16; i++) y[i] = v[i] * 0.25f;
}

/* x: n rows of k (a multiple of 16) fp32 values, row stride xs; y: row stride ys. */
void hadamard16_f32(const float *x, int64_t xs, int64_t n, int64_t k, float *y, int64_t ys, int threads) {
#pragma omp parallel for schedule(static) num_threads(n * k >= PARALLEL_MIN ? threads : 1)
  for (int64_t r = 0; r < n; r++)
    for (int64_t c = 0; c < k; c += 16) block16(x + r * xs + c, y + r * ys + c);
}
