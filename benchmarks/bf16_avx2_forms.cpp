// What a bf16 elementwise loop costs in each form on an AVX2 CPU without AVX-512 (Zen 2/3, Intel
// client cores): a standalone C++ microbenchmark, no bnlab, no Python.
//
// Claim measured (docs/benchmark_rounds.md, thirty-third session): on AVX2, bnlab's bf16 elementwise
// passes are bound by the vector shift and shuffle ports, not by memory. The widening (vpmovzxwd
// or two unpacks per 16 values), the rounding to nearest even (two shifts per 8 values) and the
// narrowing (a pack, and a permute in memory order) all issue there. Splitting each 32-byte load
// into the values at even and odd offsets (a shift and a mask), taking the rounding's parity bit
// by a compare instead of a shift, and merging the two halves back by a shift, a mask and an or
// leaves two shift-port operations per 16 values instead of seven to twelve.
//
// Two forms' families, timed at three sizes N (one thread; each figure the median of 41 samples
// of enough calls for ~2 ms, in microseconds):
// - rows of one channel (NCL: the coefficients broadcast): bnlab's form before this session (two
//   unpacks, bf16_bits, one pack per 16 values), its 8-value form (ld8, st8), and the even/odd form;
// - rows of per-value coefficients (NLC rows of 100 channels: coefficients loaded from arrays of
//   a period of 400 values, as nlc_affine_periodic expands them): bnlab's 8-value form (ld8 by
//   vpmovzxwd and a shift, st8), the same with 16 values per store, and the even/odd form with the
//   coefficient arrays split into even and odd values per 16.
// y = (x - h) * a + b, rounded to nearest even with every NaN stored as 0x7fc0 (torch's rounding;
// bnlab's st()). Every form's output is checked bit for bit against the scalar form, on random
// values and on values with NaNs, infinities, denormals and exact ties mixed in.
//
//     g++ -O3 -march=native -o /tmp/bf16_avx2_forms benchmarks/bf16_avx2_forms.cpp && /tmp/bf16_avx2_forms
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

typedef uint16_t bf16;

static inline uint16_t round_scalar(float v) {  // bnlab's st()
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return v != v ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline float widen_scalar(bf16 b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline __m256 affine(__m256 x, __m256 h, __m256 a, __m256 b) {
  return _mm256_fmadd_ps(_mm256_sub_ps(x, h), a, b);
}

// ---- bnlab's current forms
static inline __m256i bits_shift(__m256 f) {  // bnlab's bf16_bits: the bits in each lane's low half
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
static inline __m256 ld8(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline void st8(bf16* p, __m256 v) {
  const __m256i b = bits_shift(v);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0xD8)));
}

// ---- the new pieces
// u + 0x7fff + (bit 16 of u): the bits rounded to nearest even in each lane's high half; the
// parity bit by a compare (any ALU pipe) instead of a shift.
static inline __m256i rounded_high(__m256 f) {
  const __m256i u = _mm256_castps_si256(f), bit = _mm256_set1_epi32(0x10000);
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(u, bit), bit);  // -1 where bit 16 is set
  return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
}
static inline bool any_nan(__m256 f0, __m256 f1) { return _mm256_movemask_ps(_mm256_cmp_ps(f0, f1, _CMP_UNORD_Q)); }
struct EO {
  __m256 even, odd;
};
static inline EO split(const bf16* p) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)))};
}
static inline void store_eo(bf16* p, __m256 e, __m256 o) {
  __m256i v;
  if (any_nan(e, o))
    v = _mm256_or_si256(bits_shift(e), _mm256_slli_epi32(bits_shift(o), 16));
  else
    v = _mm256_or_si256(_mm256_srli_epi32(rounded_high(e), 16),
                        _mm256_and_si256(rounded_high(o), _mm256_set1_epi32((int)0xffff0000u)));
  _mm256_storeu_si256((__m256i*)p, v);
}
static inline void store16(bf16* p, __m256 lo, __m256 hi) {  // 16 values in memory order, one pack and one permute
  __m256i a, b;
  if (any_nan(lo, hi)) {
    a = bits_shift(lo), b = bits_shift(hi);
  } else {
    a = _mm256_srli_epi32(rounded_high(lo), 16), b = _mm256_srli_epi32(rounded_high(hi), 16);
  }
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
}

static long N;
typedef void (*Form)(const bf16*, bf16*, const float*);  // coef: h, a, b (N values each, or 1 for NCL)

// NCL rows
__attribute__((noinline)) void copy(const bf16* x, bf16* y, const float*) {
  for (long i = 0; i < N; i += 16) _mm256_storeu_si256((__m256i*)(y + i), _mm256_loadu_si256((const __m256i*)(x + i)));
}
__attribute__((noinline)) void ncl_scalar(const bf16* x, bf16* y, const float* c) {
  for (long i = 0; i < N; ++i) y[i] = round_scalar(std::fma(widen_scalar(x[i]) - c[0], c[1], c[2]));
}
__attribute__((noinline)) void ncl_unpacked(const bf16* x, bf16* y, const float* c) {
  const __m256 h = _mm256_set1_ps(c[0]), a = _mm256_set1_ps(c[1]), b = _mm256_set1_ps(c[2]);
  const __m256i zero = _mm256_setzero_si256();
  for (long i = 0; i < N; i += 16) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(x + i));
    const __m256 lo = affine(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), h, a, b);
    const __m256 hi = affine(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), h, a, b);
    _mm256_storeu_si256((__m256i*)(y + i), _mm256_packus_epi32(bits_shift(lo), bits_shift(hi)));
  }
}
__attribute__((noinline)) void ncl_eight(const bf16* x, bf16* y, const float* c) {
  const __m256 h = _mm256_set1_ps(c[0]), a = _mm256_set1_ps(c[1]), b = _mm256_set1_ps(c[2]);
  for (long i = 0; i < N; i += 8) st8(y + i, affine(ld8(x + i), h, a, b));
}
__attribute__((noinline)) void ncl_even_odd(const bf16* x, bf16* y, const float* c) {
  const __m256 h = _mm256_set1_ps(c[0]), a = _mm256_set1_ps(c[1]), b = _mm256_set1_ps(c[2]);
  for (long i = 0; i < N; i += 16) {
    const EO v = split(x + i);
    store_eo(y + i, affine(v.even, h, a, b), affine(v.odd, h, a, b));
  }
}

// NLC rows: coefficients per value of a period of P values (the expanded channels of rows of 100:
// nlc_affine_periodic), c[0..P), c[P..2P), c[2P..3P) (for even_odd: split per 16)
constexpr long P = 400;
__attribute__((noinline)) void nlc_scalar(const bf16* x, bf16* y, const float* c) {
  for (long i = 0; i < N; ++i) {
    const long j = i % P;
    y[i] = round_scalar(std::fma(widen_scalar(x[i]) - c[j], c[P + j], c[2 * P + j]));
  }
}
__attribute__((noinline)) void nlc_eight(const bf16* x, bf16* y, const float* c) {
  for (long r = 0; r < N; r += P)
    for (long j = 0; j < P; j += 8)
      st8(y + r + j,
          affine(ld8(x + r + j), _mm256_load_ps(c + j), _mm256_load_ps(c + P + j), _mm256_load_ps(c + 2 * P + j)));
}
__attribute__((noinline)) void nlc_sixteen(const bf16* x, bf16* y, const float* c) {
  for (long r = 0; r < N; r += P)
    for (long j = 0; j < P; j += 16) {
      const __m256 lo =
          affine(ld8(x + r + j), _mm256_load_ps(c + j), _mm256_load_ps(c + P + j), _mm256_load_ps(c + 2 * P + j));
      const __m256 hi = affine(ld8(x + r + j + 8), _mm256_load_ps(c + j + 8), _mm256_load_ps(c + P + j + 8),
                               _mm256_load_ps(c + 2 * P + j + 8));
      store16(y + r + j, lo, hi);
    }
}
__attribute__((noinline)) void nlc_even_odd(const bf16* x, bf16* y, const float* c) {  // c split per 16: 8 even, 8 odd
  for (long r = 0; r < N; r += P)
    for (long j = 0; j < P; j += 16) {
      const EO v = split(x + r + j);
      const __m256 e =
          affine(v.even, _mm256_load_ps(c + j), _mm256_load_ps(c + P + j), _mm256_load_ps(c + 2 * P + j));
      const __m256 o = affine(v.odd, _mm256_load_ps(c + j + 8), _mm256_load_ps(c + P + j + 8),
                              _mm256_load_ps(c + 2 * P + j + 8));
      store_eo(y + r + j, e, o);
    }
}

static double median_us(Form f, const bf16* x, bf16* y, const float* c) {
  int reps = 1;
  for (;;) {  // calls per sample: ~2 ms
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f(x, y, c);
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > 2e-3) break;
    reps *= 2;
  }
  std::vector<double> t;
  for (int s = 0; s < 41; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) f(x, y, c);
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  std::nth_element(t.begin(), t.begin() + 20, t.end());
  return t[20];
}

static void split_coefficients(const float* src, float* dst) {  // per 16: the 8 at even offsets, then the 8 odd
  for (long i = 0; i < P; i += 16)
    for (int k = 0; k < 8; ++k) dst[i + k] = src[i + 2 * k], dst[i + 8 + k] = src[i + 2 * k + 1];
}

int main(int argc, char** argv) {
  std::vector<long> sizes = {4000, 64000, 1024000};
  if (argc > 1) {
    char* end = nullptr;
    const long n = std::strtol(argv[1], &end, 10);
    if (end == argv[1] || *end != '\0' || n < P || n % P != 0) {
      std::fprintf(stderr, "N: expected a whole number of values, a multiple of 400, got '%s'\n", argv[1]);
      return 2;
    }
    sizes = {n};
  }
  std::mt19937 gen(33);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const long n : sizes) {
    N = n;
    bf16 *x = (bf16*)std::aligned_alloc(64, N * 2), *y = (bf16*)std::aligned_alloc(64, N * 2),
         *ref = (bf16*)std::aligned_alloc(64, N * 2);
    float *c = (float*)std::aligned_alloc(64, 3 * P * 4), *ce = (float*)std::aligned_alloc(64, 3 * P * 4);
    const float c1[3] = {0.25f, 1.7f, -0.3f};
    for (int special = 0; special < 2; ++special) {  // plain values, then NaN/inf/denormal/tie values mixed in
      for (long i = 0; i < N; ++i) x[i] = round_scalar(normal(gen));
      for (long i = 0; i < 3 * P; ++i)  // h near 0, a near 1, b of any size
        c[i] = i < P ? normal(gen) * 0.1f : i < 2 * P ? 1.f + 0.2f * normal(gen) : normal(gen);
      if (special) {
        const uint16_t kinds[6] = {0x7fc0, 0xff80, 0x7f80, 0x0001, 0x8040, 0xffc1};
        for (long i = 0; i < N; i += 7) x[i] = kinds[(i / 7) % 6];
        for (long j = 0; j < P; j += 5) {  // denormal and tie-producing results
          c[P + j] = (j / 5) % 3 ? 1.0f : 1e-38f;
          c[j] = 0, c[2 * P + j] = (j / 5) % 2 ? 0.f : 1.0f + 1.0f / 256;
        }
      }
      split_coefficients(c, ce), split_coefficients(c + P, ce + P), split_coefficients(c + 2 * P, ce + 2 * P);
      const struct {
        const char* name;
        Form f;
        Form ref;
        const float* c;
      } forms[] = {{"ncl unpacked", ncl_unpacked, ncl_scalar, c1}, {"ncl eight", ncl_eight, ncl_scalar, c1},
                   {"ncl even_odd", ncl_even_odd, ncl_scalar, c1}, {"nlc eight", nlc_eight, nlc_scalar, c},
                   {"nlc sixteen", nlc_sixteen, nlc_scalar, c},    {"nlc even_odd", nlc_even_odd, nlc_scalar, ce}};
      for (const auto& form : forms) {
        form.ref(x, ref, form.ref == nlc_scalar ? c : c1);
        std::memset(y, 0, N * 2);
        form.f(x, y, form.c);
        if (std::memcmp(y, ref, N * 2) != 0) {
          std::fprintf(stderr, "%s differs from the scalar form (N=%ld, special=%d)\n", form.name, N, special);
          return 1;
        }
      }
    }
    for (long i = 0; i < N; ++i) x[i] = round_scalar(normal(gen));  // timing: no special values
    std::printf("N = %ld values (%ld KiB in, %ld KiB out), one thread, median us\n", N, N * 2 / 1024, N * 2 / 1024);
    std::printf("  copy          %8.2f\n", median_us(copy, x, y, c));
    std::printf("  ncl unpacked  %8.2f   (bnlab NCL rows before)\n", median_us(ncl_unpacked, x, y, c1));
    std::printf("  ncl eight     %8.2f\n", median_us(ncl_eight, x, y, c1));
    std::printf("  ncl even_odd  %8.2f\n", median_us(ncl_even_odd, x, y, c1));
    std::printf("  nlc eight     %8.2f   (bnlab NLC rows before)\n", median_us(nlc_eight, x, y, c));
    std::printf("  nlc sixteen   %8.2f\n", median_us(nlc_sixteen, x, y, c));
    std::printf("  nlc even_odd  %8.2f\n", median_us(nlc_even_odd, x, y, ce));
    std::free(x), std::free(y), std::free(ref), std::free(c), std::free(ce);
  }
  return 0;
}
