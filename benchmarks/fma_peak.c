/* The fp32 FMA peak of one x86 core with AVX2, measured: ten independent 8-lane fused multiply-add chains (more
 * than the FMA units' latency x throughput, so the units never wait), 2 FLOPs per lane and FMA. The ceiling no
 * program on that core can pass, to set bench_train_step.py's figures against (issue 19, item 5):
 *
 *     gcc -O2 -mavx2 -mfma benchmarks/fma_peak.c -o /tmp/fma_peak && taskset -c 0 /tmp/fma_peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define FMA(x) x = _mm256_fmadd_ps(x, m, c)

int main(void) {
  const long n = 300000000L;
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  __m256 a0 = _mm256_set1_ps(0.1f), a1 = _mm256_set1_ps(0.2f), a2 = _mm256_set1_ps(0.3f), a3 = _mm256_set1_ps(0.4f),
         a4 = _mm256_set1_ps(0.5f), a5 = _mm256_set1_ps(0.6f), a6 = _mm256_set1_ps(0.7f), a7 = _mm256_set1_ps(0.8f),
         a8 = _mm256_set1_ps(0.9f), a9 = _mm256_set1_ps(1.0f);
  struct timespec start, end;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (long i = 0; i < n; i++) {
    FMA(a0); FMA(a1); FMA(a2); FMA(a3); FMA(a4); FMA(a5); FMA(a6); FMA(a7); FMA(a8); FMA(a9);
  }
  clock_gettime(CLOCK_MONOTONIC, &end);
  const double seconds = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) * 1e-9;
  /* Every chain's result is used, so the compiler cannot drop any of them. */
  __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(_mm256_add_ps(a6, a7),
                                                                                _mm256_add_ps(a8, a9))));
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  printf("fp32 FMA peak of one core: %.1f GFLOP/s (%.2f s; checksum %f)\n", 10.0 * 8 * 2 * n / seconds / 1e9, seconds,
         lanes[0]);
  return 0;
}
