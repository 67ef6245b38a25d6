// What an NLC eval loop costs against a copy, by the form of its coefficient loads: a standalone
// C++ microbenchmark, no bnlab, no Python.
//
// Claim measured (docs/benchmark_rounds.md, thirty-first session): at (8192, 100) float32 (3.3 MB, in
// the L3) bnlab's eval kernel runs at about 0.88 of torch's copy_; how much of that the three
// coefficient vectors loaded per 16 values cost (arrays of one period, as the periodic rows walk
// them), against the same loop with the coefficients broadcast from registers, a plain copy, and
// the walk two blocks per step (nlc_affine_periodic's float32 pairs).
// y = (x - h) * a + b over 819,200 float32 values, one thread; each figure the median of 60 samples
// of 20 calls, in microseconds; three rounds.
//
//     g++ -O3 -march=native -o /tmp/eval_loop_forms benchmarks/eval_loop_forms.cpp && /tmp/eval_loop_forms
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static const long N = 8192 * 100;
alignas(64) static float coef_h[512], coef_a[512], coef_b[512];

__attribute__((noinline)) void copy512(const float* x, float* y) {
  for (long i = 0; i < N; i += 16) _mm512_store_ps(y + i, _mm512_load_ps(x + i));
}
__attribute__((noinline)) void copy256(const float* x, float* y) {
  for (long i = 0; i < N; i += 8) _mm256_store_ps(y + i, _mm256_load_ps(x + i));
}
// Coefficients broadcast (one channel's, as an NCHW plane's): no coefficient loads in the loop.
__attribute__((noinline)) void broadcast512(const float* x, float* y) {
  const __m512 h = _mm512_set1_ps(0.1f), a = _mm512_set1_ps(1.1f), b = _mm512_set1_ps(0.2f);
  for (long i = 0; i < N; i += 16)
    _mm512_store_ps(y + i, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x + i), h), a, b));
}
// Coefficient arrays of period P values (P = lcm(C, 16): 400 for 100 channels), three loads per vector.
__attribute__((noinline)) void arrays512(const float* x, float* y, long P) {
  for (long r = 0; r < N; r += P)
    for (long j = 0; j < P; j += 16)
      _mm512_store_ps(y + r + j, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x + r + j), _mm512_load_ps(coef_h + j)),
                                                 _mm512_load_ps(coef_a + j), _mm512_load_ps(coef_b + j)));
}
__attribute__((noinline)) void arrays256(const float* x, float* y, long P) {
  for (long r = 0; r < N; r += P)
    for (long j = 0; j < P; j += 8)
      _mm256_store_ps(y + r + j, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_load_ps(x + r + j), _mm256_load_ps(coef_h + j)),
                                                 _mm256_load_ps(coef_a + j), _mm256_load_ps(coef_b + j)));
}
// Two blocks of P values per step, each coefficient vector loaded once for both (1.5 per vector).
__attribute__((noinline)) void pairs512(const float* x, float* y, long P) {
  for (long r = 0; r + 2 * P <= N; r += 2 * P)
    for (long j = 0; j < P; j += 16) {
      const __m512 h = _mm512_load_ps(coef_h + j), a = _mm512_load_ps(coef_a + j), b = _mm512_load_ps(coef_b + j);
      _mm512_store_ps(y + r + j, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x + r + j), h), a, b));
      _mm512_store_ps(y + r + P + j, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x + r + P + j), h), a, b));
    }
}
// Period 128 with all 24 coefficient vectors held in registers.
__attribute__((noinline)) void registers512_128(const float* x, float* y) {
  __m512 h[8], a[8], b[8];
  for (int k = 0; k < 8; ++k)
    h[k] = _mm512_load_ps(coef_h + 16 * k), a[k] = _mm512_load_ps(coef_a + 16 * k), b[k] = _mm512_load_ps(coef_b + 16 * k);
  for (long r = 0; r < N; r += 128)
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k)
      _mm512_store_ps(y + r + 16 * k, _mm512_fmadd_ps(_mm512_sub_ps(_mm512_load_ps(x + r + 16 * k), h[k]), a[k], b[k]));
}

template <class F>
double median_us(F f) {
  std::vector<double> t;
  for (int rep = 0; rep < 60; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int k = 0; k < 20; ++k) f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / 20);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  float* x = (float*)aligned_alloc(4096, N * 4 + 4096) + 16;  // 64 bytes past a page, as torch's tensors
  float* y = (float*)aligned_alloc(4096, N * 4 + 4096);
  for (long i = 0; i < N; ++i) x[i] = (float)(i % 7);
  std::memset(y, 0, N * 4);
  for (int i = 0; i < 512; ++i) coef_h[i] = 0.1f, coef_a[i] = 1.1f, coef_b[i] = 0.2f;
  std::printf("copy 512-bit | copy 256-bit | broadcast | arrays P=400 | arrays 256-bit P=400 | pairs P=400 | "
              "arrays P=128 | registers P=128\n");
  for (int round = 0; round < 3; ++round)
    std::printf("%.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f\n", median_us([&] { copy512(x, y); }),
                median_us([&] { copy256(x, y); }), median_us([&] { broadcast512(x, y); }),
                median_us([&] { arrays512(x, y, 400); }), median_us([&] { arrays256(x, y, 400); }),
                median_us([&] { pairs512(x, y, 400); }), median_us([&] { arrays512(x, y, 128); }),
                median_us([&] { registers512_128(x, y); }));
}
