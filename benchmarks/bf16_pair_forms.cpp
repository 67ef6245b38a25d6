// What a bf16 NCL eval loop costs in each form of its pairs of vectors, against a bf16 copy: a
// standalone C++ microbenchmark (AVX512-BF16), no bnlab, no Python.
//
// Claim measured (docs/benchmark_rounds.md, thirty-second session): the widening of bf16 to float32 by
// vpmovzxwd (ld16, two per 32 values) bounds bnlab's bf16 elementwise passes on Zen 4; splitting
// each 64-byte load into the values at even and odd offsets (a shift and a mask: eo_split) and
// putting the rounded results back in order with one vpermw (st32_eo) takes 0.81-0.89 of the time, once
// the loads run two pairs ahead of the stores. Without that, an output 64 or 128 bytes past the
// input modulo 4 KiB made the split form slower than the widening one (4K aliasing: a load waits
// for an earlier store whose address has the same low 12 bits).
// The second table: channels-last rows of 256 channels (coefficients per channel, loaded from
// arrays; for the split form arrays split into even and odd channels), where the split form is
// slower: with six coefficient loads per pair, the widening is not what bounds those rows.
// y = (x - h) * a + b over N bf16 values (coefficients broadcast, as in an NCL row), rounded to
// nearest even by vcvtne2ps2bf16 (bnlab's test for NaN and denormal results kept, never true here);
// one thread; each figure the median of 41 samples of 10 calls, in microseconds, by the output's
// offset from the input modulo 4 KiB. Every form's output is checked bit for bit against the first.
//
//     g++ -O3 -march=native -o /tmp/bf16_pair_forms benchmarks/bf16_pair_forms.cpp && /tmp/bf16_pair_forms [N]
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef uint16_t bf16;
static long N = 1 << 20;

static inline __m512 widen16(const bf16* p) {  // bnlab's ld16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 affine(__m512 x, __m512 h, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(_mm512_sub_ps(x, h), a, b);
}
static inline bool special(__m512 f0, __m512 f1) {  // a NaN or a denormal: bnlab's integer rounding then
  return _mm512_fpclass_ps_mask(f0, 0xa1) | _mm512_fpclass_ps_mask(f1, 0xa1);
}

__attribute__((noinline)) void copy(const bf16* x, bf16* y, float, float, float) {
  for (long i = 0; i < N; i += 32) _mm512_storeu_si512(y + i, _mm512_loadu_si512(x + i));
}
// bnlab before: two widening loads, one vcvtne2ps2bf16 per 32 values (st32)
__attribute__((noinline)) void widened(const bf16* x, bf16* y, float hh, float aa, float bb) {
  const __m512 h = _mm512_set1_ps(hh), a = _mm512_set1_ps(aa), b = _mm512_set1_ps(bb);
  for (long i = 0; i < N; i += 32) {
    const __m512 f0 = affine(widen16(x + i), h, a, b), f1 = affine(widen16(x + i + 16), h, a, b);
    if (special(f0, f1)) std::abort();
    _mm512_storeu_si512(y + i, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
  }
}
alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
static inline void even_odd_store(bf16* p, __m512i v, __m512 h, __m512 a, __m512 b) {
  const __m512 e = affine(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), h, a, b);
  const __m512 o = affine(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u))), h, a, b);
  if (special(e, o)) std::abort();
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), (__m512i)_mm512_cvtne2ps_pbh(o, e)));
}
// even/odd, each pair loaded right before its store
__attribute__((noinline)) void even_odd(const bf16* x, bf16* y, float hh, float aa, float bb) {
  const __m512 h = _mm512_set1_ps(hh), a = _mm512_set1_ps(aa), b = _mm512_set1_ps(bb);
  for (long i = 0; i < N; i += 32) even_odd_store(y + i, _mm512_loadu_si512(x + i), h, a, b);
}
// even/odd, loads two pairs ahead of the stores (bnlab's bf16_row_in_pairs)
__attribute__((noinline)) void even_odd_ahead(const bf16* x, bf16* y, float hh, float aa, float bb) {
  const __m512 h = _mm512_set1_ps(hh), a = _mm512_set1_ps(aa), b = _mm512_set1_ps(bb);
  __m512i now = _mm512_loadu_si512(x), next = _mm512_loadu_si512(x + 32);
  for (long i = 0; i < N; i += 32) {
    const __m512i after = i + 96 <= N ? _mm512_loadu_si512(x + i + 64) : next;
    even_odd_store(y + i, now, h, a, b);
    now = next, next = after;
  }
}

// Channels-last rows of kC channels: coefficient arrays h, a, b (and split by parity: hs, as, bs).
constexpr long kC = 256;
alignas(64) static float H[kC], A[kC], B[kC], HS[kC], AS[kC], BS[kC];
__attribute__((noinline)) void rows_widened(const bf16* x, bf16* y, float, float, float) {
  for (long r = 0; r < N; r += kC)
    for (long i = 0; i < kC; i += 32) {
      const __m512 f0 = affine(widen16(x + r + i), _mm512_load_ps(H + i), _mm512_load_ps(A + i), _mm512_load_ps(B + i));
      const __m512 f1 = affine(widen16(x + r + i + 16), _mm512_load_ps(H + i + 16), _mm512_load_ps(A + i + 16),
                               _mm512_load_ps(B + i + 16));
      if (special(f0, f1)) std::abort();
      _mm512_storeu_si512(y + r + i, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
    }
}
__attribute__((noinline)) void rows_even_odd(const bf16* x, bf16* y, float, float, float) {
  for (long r = 0; r < N; r += kC)
    for (long i = 0; i < kC; i += 32) {
      const __m512i v = _mm512_loadu_si512(x + r + i);
      const __m512 e = affine(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_load_ps(HS + i),
                              _mm512_load_ps(AS + i), _mm512_load_ps(BS + i));
      const __m512 o = affine(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u))),
                              _mm512_load_ps(HS + i + 16), _mm512_load_ps(AS + i + 16), _mm512_load_ps(BS + i + 16));
      if (special(e, o)) std::abort();
      _mm512_storeu_si512(y + r + i,
                          _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), (__m512i)_mm512_cvtne2ps_pbh(o, e)));
    }
}

template <class F>
double median_us(F f) {
  std::vector<double> t;
  for (int rep = 0; rep < 41; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (int k = 0; k < 10; ++k) f();
    t.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count() / 10);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  if (argc > 1) {
    char* end = nullptr;
    const long n = std::strtol(argv[1], &end, 10);
    if (*argv[1] == '\0' || *end != '\0' || n < 256)
      return std::fprintf(stderr, "N: expected a whole number of values >= 256, got '%s'\n", argv[1]), 2;
    N = n / 32 * 32;
  }
  bf16* x = (bf16*)aligned_alloc(4096, N * 2 + 8192);
  bf16* yb = (bf16*)aligned_alloc(4096, N * 2 + 8192);
  bf16* ref = (bf16*)aligned_alloc(4096, N * 2 + 8192);
  for (long i = 0; i < N; ++i) {
    const float f = (float)((i * 7919) % 1000) / 100.f - 5.f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    x[i] = (bf16)(u >> 16);
  }
  typedef void (*Form)(const bf16*, bf16*, float, float, float);
  const Form forms[] = {copy, widened, even_odd, even_odd_ahead};
  widened(x, ref, 0.3f, 1.7f, 0.1f);
  for (int k = 2; k < 4; ++k) {
    forms[k](x, yb, 0.3f, 1.7f, 0.1f);
    if (std::memcmp(ref, yb, N * 2) != 0) return std::printf("form %d: other bits than the widening form\n", k), 1;
  }
  std::printf("N=%ld bf16 values, one thread: output offset (bytes mod 4096) | copy | widened | even/odd | "
              "even/odd two ahead (us)\n", N);
  for (int offset : {0, 64, 128, 256, 1024, 2048, 4032}) {
    bf16* y = yb + offset / 2;
    std::printf("%4d", offset);
    for (Form f : forms) std::printf(" | %.1f", median_us([&] { f(x, y, 0.3f, 1.7f, 0.1f); }));
    std::printf("\n");
  }
  N = N / kC * kC;
  for (int c = 0; c < kC; ++c) H[c] = 0.01f * c, A[c] = 1.0f + 0.001f * c, B[c] = -0.002f * c;
  for (int j = 0; j < kC; j += 32)
    for (int k = 0; k < 16; ++k) {
      HS[j + k] = H[j + 2 * k], AS[j + k] = A[j + 2 * k], BS[j + k] = B[j + 2 * k];
      HS[j + 16 + k] = H[j + 2 * k + 1], AS[j + 16 + k] = A[j + 2 * k + 1], BS[j + 16 + k] = B[j + 2 * k + 1];
    }
  rows_widened(x, ref, 0, 0, 0);
  rows_even_odd(x, yb, 0, 0, 0);
  if (std::memcmp(ref, yb, N * 2) != 0) return std::printf("channels-last rows: other bits\n"), 1;
  std::printf("channels-last rows of %ld channels: output offset | widened | even/odd, split coefficients (us)\n", kC);
  for (int offset : {0, 64, 2048}) {
    bf16* y = yb + offset / 2;
    std::printf("%4d | %.1f | %.1f\n", offset, median_us([&] { rows_widened(x, y, 0, 0, 0); }),
                median_us([&] { rows_even_odd(x, y, 0, 0, 0); }));
  }
}
