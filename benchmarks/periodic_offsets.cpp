// What the float32 periodic eval walk (nlc_affine_periodic: rows of 100 channels, four blocks of
// 400 values per step, the three coefficient vectors loaded once for the four) costs against a copy
// at each relative page offset of output and input: a standalone C++ microbenchmark, no bnlab.
//
// Claim measured (docs/benchmark_rounds.md, fifty-third session): the eval of (8192, 100) runs at
// 0.79-0.86 of torch's copy_ in bnlab's benchmark, at about 1.0 for rows of 96, 112 or 128
// channels (the register rows); the walk itself, apart from Python, is 1.03-1.23x the copy, by
// where the output lies against the input modulo 4 KiB (4K aliasing of the later loads with
// stores still in the store buffer), 1.08-1.12x at the layout of a bnlab process (input 64 bytes
// past a page, output at a page: y - x = -16 floats). Also the same walk one block at a time in
// memory order (1.03-1.53x) and a torch-like 256-bit copy loop (flat at every offset).
// y = (x - h) * a + b over 819,200 float32 values, one thread; medians of 15 samples of 100 calls,
// microseconds.
//
//     g++ -O3 -march=native -o /tmp/periodic_offsets benchmarks/periodic_offsets.cpp && /tmp/periodic_offsets 8192 100
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>
static inline __m512 affine16(__m512 x, __m512 h, __m512 a, __m512 b) { return _mm512_fmadd_ps(_mm512_sub_ps(x, h), a, b); }
#define PIN(v) asm("" : "+v"(v))
void periodic4(const float* x, float* y, long R, long C, const float* h, const float* a, const float* b, long n) {
  long rows = n / C, r = 0;
  for (; r + 4 * rows <= R; r += 4 * rows) {
    const float* p = x + r * C; float* q = y + r * C;
    for (long j = 0; j < n; j += 16) {
      __m512 hv = _mm512_load_ps(h + j), av = _mm512_load_ps(a + j), bv = _mm512_load_ps(b + j);
      PIN(hv); PIN(av); PIN(bv);
      _mm512_storeu_ps(q + j, affine16(_mm512_loadu_ps(p + j), hv, av, bv));
      _mm512_storeu_ps(q + n + j, affine16(_mm512_loadu_ps(p + n + j), hv, av, bv));
      _mm512_storeu_ps(q + 2 * n + j, affine16(_mm512_loadu_ps(p + 2 * n + j), hv, av, bv));
      _mm512_storeu_ps(q + 3 * n + j, affine16(_mm512_loadu_ps(p + 3 * n + j), hv, av, bv));
    }
  }
}
void seqp(const float* x, float* y, long R, long C, const float* h, const float* a, const float* b, long n) {
  long rows = n / C, r = 0;
  for (; r + rows <= R; r += rows) {
    const float* p = x + r * C; float* q = y + r * C;
    for (long j = 0; j < n; j += 16)
      _mm512_storeu_ps(q + j, affine16(_mm512_loadu_ps(p + j), _mm512_load_ps(h + j), _mm512_load_ps(a + j), _mm512_load_ps(b + j)));
  }
}
void copy256(const float* x, float* y, long n) { for (long i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_loadu_ps(x + i)); }
int main(int argc, char** argv) {
  long R = atol(argv[1]), reps = atol(argv[2]);
  long C = 100, n = 400, total = R * C;
  float* xb = (float*)aligned_alloc(4096, total * 4 + 8192); float* yb = (float*)aligned_alloc(4096, total * 4 + 8192);
  float* x = xb + 16;
  for (long i = 0; i < total; ++i) x[i] = i % 7;
  alignas(64) float h[512], a[512], b[512];
  for (int i = 0; i < 512; ++i) h[i] = a[i] = b[i] = 1.f;
  const int offs[] = {0, 4, 8, 12, 16, 20, 32, 48, 64, 128, 256, 512, 768};
  const int no = sizeof(offs) / sizeof(offs[0]);
  std::vector<double> t[3][16];
  for (int rep = 0; rep < 15; ++rep) for (int o = 0; o < no; ++o) for (int k = 0; k < 3; ++k) {
    float* y = yb + offs[o];
    auto s = std::chrono::steady_clock::now();
    for (long i = 0; i < reps; ++i) {
      if (k == 0) periodic4(x, y, R, C, h, a, b, n); else if (k == 1) seqp(x, y, R, C, h, a, b, n); else copy256(x, y, total);
      asm volatile("" ::: "memory");
    }
    t[k][o].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count() / reps * 1e6);
  }
  printf("y - x (floats, mod 1024) | periodic4 | sequential periodic | copy256 (us)\n");
  for (int o = 0; o < no; ++o) {
    double v[3]; for (int k = 0; k < 3; ++k) { std::sort(t[k][o].begin(), t[k][o].end()); v[k] = t[k][o][7]; }
    printf("%5d | %7.2f | %7.2f | %7.2f\n", (offs[o] - 16 + 1024) % 1024, v[0], v[1], v[2]);
  }
}
