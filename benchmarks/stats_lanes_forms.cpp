// A reduction over one contiguous float32 buffer in the forms bnlab's statistics could take,
// beside a memcpy of the buffer: a standalone C++ micro-benchmark, no bnlab, no Python.
//
// Claim measured (docs/benchmarks.md, "Where bnlab still loses or only ties"; docs/benchmark_rounds.md,
// thirty-eighth session): on the Zen 3 VM a 12.8 MB buffer held in the L3 is summed in float32
// in 90 us and summed with its squares, shift included, in about 130 us, in float32 lanes or in
// sixteen float64 lanes (add_shifted_f32's AVX2 form: four Σd and four Σd² vectors of four
// doubles); the kernels' statistics of (64, 256, 14, 14) NCHW, the same bytes in rows of 196
// values, take 250-290 us. Same lanes, same chains: what differs is the rows' scalar tails and
// partial sums kept from row to row, not the memory.
// Two threads, each a half of the buffer; medians of 31 samples of 10 calls, in microseconds.
// Argument: the number of float32 values (default 3,211,264: 64 x 256 x 14 x 14).
//
//     g++ -O3 -march=native -fopenmp -o /tmp/stats_lanes_forms benchmarks/stats_lanes_forms.cpp && /tmp/stats_lanes_forms
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static volatile double sink = 0;

// Σx in four float32 vectors.
static void sum_f32(const float* x, int64_t a0, int64_t a1) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = a0; i < a1; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_load_ps(x + i));
    s1 = _mm256_add_ps(s1, _mm256_load_ps(x + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_load_ps(x + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_load_ps(x + i + 24));
  }
  sink = sink + _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

// Σ(x - K) and Σ(x - K)² in two float32 vectors each.
static void sums_f32(const float* x, int64_t a0, int64_t a1) {
  const __m256 k = _mm256_set1_ps(0.5f);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, q0 = s0, q1 = s0;
  for (int64_t i = a0; i < a1; i += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_load_ps(x + i), k), d1 = _mm256_sub_ps(_mm256_load_ps(x + i + 8), k);
    s0 = _mm256_add_ps(s0, d0);
    s1 = _mm256_add_ps(s1, d1);
    q0 = _mm256_fmadd_ps(d0, d0, q0);
    q1 = _mm256_fmadd_ps(d1, d1, q1);
  }
  sink = sink + _mm256_cvtss_f32(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(q0, q1)));
}

// The same in sixteen float64 lanes, d = x·1 + (-K) by one FMA (add_shifted_f32's AVX2 form).
static void sums_f64_lanes(const float* x, int64_t a0, int64_t a1) {
  const __m256d one = _mm256_set1_pd(1.0), nk = _mm256_set1_pd(-0.5);
  __m256d S[4], Q[4];
  for (int h = 0; h < 4; ++h) S[h] = Q[h] = _mm256_setzero_pd();
  for (int64_t i = a0; i < a1; i += 16)
    for (int h = 0; h < 4; ++h) {
      const __m256d d = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_load_ps(x + i + 4 * h)), one, nk);
      S[h] = _mm256_add_pd(S[h], d);
      Q[h] = _mm256_fmadd_pd(d, d, Q[h]);
    }
  const __m256d t = _mm256_add_pd(_mm256_add_pd(S[0], S[1]), _mm256_add_pd(Q[2], Q[3]));
  sink = sink + _mm256_cvtsd_f64(t);
}

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) / 64 * 64 : 3211264;
  if (n < 64) {
    std::fprintf(stderr, "values: expected a count of float32 values, 64 or more, got %s\n", argc > 1 ? argv[1] : "");
    return 2;
  }
  float* x = (float*)std::aligned_alloc(64, (size_t)n * 4);
  float* y = (float*)std::aligned_alloc(64, (size_t)n * 4);
  for (int64_t i = 0; i < n; ++i) x[i] = (float)(i % 7) * 0.3f, y[i] = 0;
  const char* names[] = {"memcpy", "sum, float32", "sum and squares, float32", "sum and squares, 16 float64 lanes"};
  std::vector<double> t[4];
  for (int round = 0; round < 31; ++round)
    for (int form = 0; form < 4; ++form) {
      const auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < 10; ++r) {
#pragma omp parallel num_threads(2)
        {
          const int T = omp_get_num_threads(), id = omp_get_thread_num();
          const int64_t a0 = n * id / T / 64 * 64, a1 = id + 1 == T ? n : n * (id + 1) / T / 64 * 64;
          if (form == 0) std::memcpy(y + a0, x + a0, (size_t)(a1 - a0) * 4);
          if (form == 1) sum_f32(x, a0, a1);
          if (form == 2) sums_f32(x, a0, a1);
          if (form == 3) sums_f64_lanes(x, a0, a1);
        }
      }
      const auto spent = std::chrono::steady_clock::now() - start;
      t[form].push_back(std::chrono::duration<double, std::micro>(spent).count() / 10);
    }
  for (int form = 0; form < 4; ++form) {
    std::sort(t[form].begin(), t[form].end());
    std::printf("%-36s %8.1f us\n", names[form], t[form][t[form].size() / 2]);
  }
  return 0;
}
