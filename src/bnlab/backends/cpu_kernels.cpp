// bnlab's CPU kernels: compiled at first use by bnlab/backends/cpu_build.py (see there how they are loaded).
//
// Plain C++ with OpenMP and no torch headers, so it compiles in a few seconds. Every entry point
// takes raw pointers, a dtype code and the layout (see Layout) and does one whole BN pass:
//   bn_forward_train  statistics (two-pass per cache-sized chunk, merged with Chan's rule) then normalize
//   bn_backward       Σdy and Σdy·x̂ then dx, reusing each channel's data while it is in cache
//   bn_normalize      the elementwise forward with given statistics (eval and the primitive)
//   bn_grad_input     the elementwise backward with given sums (the primitive)
//   bn_update_running the running-average update (torch's convention, unbiased variance)
// Statistics are float64 whatever the input dtype; the math is docs/math.md's. A loop that
// accumulates a product writes the multiply-add as std::fma, never as `acc += a * b`: GCC's
// tuning for AMD Zen (what -march=native picks there) splits contracted multiply-add chains into
// a multiply and an add, and the sums then differed from other machines' in the last bit
// (tests/test_backend_cpu_isa.py).
//
// Work split (NCL): a channel's values are cut into chunks of ~kChunk elements (a row segment, or
// several short rows). With enough channels, each channel is one task for whichever thread is
// free: its statistics, then its elementwise pass while its values are still in that core's cache,
// which reads x from memory once instead of twice and needs no barrier. With few channels, the
// chunks of each wave of channels are shared among all threads, with one barrier per wave
// (cpu_kernels_waves.inc). Those fused walks pay off for tensors larger than the L3, and whenever
// the output streams past the caches; smaller ones (below half of it) run the statistics, then the
// elementwise pass over the whole tensor in memory order, and their gradient sums in memory order
// too (cpu_kernels_ncl_flat.inc). Short rows of many channels, whatever the tensor's size, take
// the fused walk by groups of adjacent channels instead (cpu_kernels_ncl_groups.inc).
// NLC (channels innermost): threads take shares of the rows.
//
// Parts. cpu_build compiles this file once per dtype (BNLAB_PART_DTYPE=code: that dtype's kernels
// only, their entry points renamed bn_*_dt<code>) and once as the main part (BNLAB_PART_MAIN: no
// kernel, the entry points that hand each call to its dtype's part, cpu_kernels_parts.inc, and the
// Python glue), all at once, and links the objects into one library: the four dtypes' template
// instances are most of the compile (6-8 s each on the Zen 3 VM, 3 s for the rest: 26.8 s in one
// file, 18.0 s in parts on its two cores; the same bits, benchmarks/compare_builds.py). Without
// either macro, the whole library in one file (cpu_build's fallback).
#if defined(BNLAB_PART_DTYPE) && defined(BNLAB_PART_MAIN)
#error "cpu_kernels.cpp: BNLAB_PART_DTYPE or BNLAB_PART_MAIN, not both"
#endif
#if defined(BNLAB_PART_DTYPE)
#define BNLAB_KERNELS_FOR(code) (BNLAB_PART_DTYPE == (code))
#define BNLAB_PASTE_(name, code) name##_dt##code
#define BNLAB_PASTE(name, code) BNLAB_PASTE_(name, code)
#define bn_forward_train BNLAB_PASTE(bn_forward_train, BNLAB_PART_DTYPE)
#define bn_backward BNLAB_PASTE(bn_backward, BNLAB_PART_DTYPE)
#define bn_normalize BNLAB_PASTE(bn_normalize, BNLAB_PART_DTYPE)
#define bn_eval_backward BNLAB_PASTE(bn_eval_backward, BNLAB_PART_DTYPE)
#define bn_eval BNLAB_PASTE(bn_eval, BNLAB_PART_DTYPE)
#define bn_eval_graph BNLAB_PASTE(bn_eval_graph, BNLAB_PART_DTYPE)
#define bn_grad_input BNLAB_PASTE(bn_grad_input, BNLAB_PART_DTYPE)
#elif defined(BNLAB_PART_MAIN)
#define BNLAB_KERNELS_FOR(code) 0
#else
#define BNLAB_KERNELS_FOR(code) 1
#endif
#ifdef BNLAB_PYTHON_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h>  // before any standard header, as Python's documentation requires
#endif

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else  // a compiler without OpenMP still builds the kernels, single-threaded
static inline int omp_get_num_threads() { return 1; }
static inline int omp_get_thread_num() { return 0; }
static inline int omp_in_parallel() { return 0; }  // (parallel_region's; without it this build failed)
#endif

namespace {

constexpr int64_t kChunk = 2048;  // elements per chunk: two passes over it stay in L1

// ---- storage types -----------------------------------------------------------------------
enum DType { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

struct bf16 { uint16_t bits; };

template <typename S> struct Traits;                       // S: storage type
template <> struct Traits<float> { using F = float; };     // F: arithmetic type of the elementwise phase
template <> struct Traits<double> { using F = double; };
template <> struct Traits<bf16> { using F = float; };
template <> struct Traits<_Float16> { using F = float; };

// Whether bf16 rows take the pair forms (st32, bf16_row_in_pairs below): AVX512-BF16 builds.
constexpr bool kBf16Pairs =
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    true;
#else
    false;
#endif

static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline double ld(const double* p, int64_t i) { return p[i]; }
#if defined(__F16C__)
// One float16 value through F16C's conversion (exact widening; narrowing rounds to nearest even,
// subnormals kept, as (_Float16)v): GCC's own conversion code ran several times slower.
static inline float ld(const _Float16* p, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, p + i, 2);
  return _cvtsh_ss(bits);
}
#else
static inline float ld(const _Float16* p, int64_t i) { return (float)p[i]; }
#endif
static inline float ld(const bf16* p, int64_t i) {
  uint32_t u = (uint32_t)p[i].bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(double* p, int64_t i, double v) { p[i] = v; }
#if defined(__F16C__)
static inline void st(_Float16* p, int64_t i, float v) {
  const uint16_t bits = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p + i, &bits, 2);
}
#else
static inline void st(_Float16* p, int64_t i, float v) { p[i] = (_Float16)v; }
#endif
static inline void st(bf16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even, as torch
  p[i].bits = (uint16_t)(v != v ? 0x7fc0u : rounded);         // NaN stays NaN (a quiet one)
}

// Stores 16 consecutive results (one vector body of the elementwise loops, kLanes values).
constexpr int kStoreLanes = 16;
template <typename S, typename F>
static inline void st_lanes(S* p, int64_t i0, const F* v) {
  for (int j = 0; j < kStoreLanes; ++j) st(p, i0 + j, v[j]);
}
#ifdef __AVX2__
// float32/float64: whole-vector stores. From the scalar loop GCC 12 emits one 256-bit store plus
// four partial ones (xmm, movlps, two extractps) per 16 values in the elementwise bodies: the
// stores, not the arithmetic, then bound the NLC normalize (0.6 cycles per value at C = 100).
static inline void st_lanes(float* p, int64_t i0, const float* v) {
  _mm256_storeu_ps(p + i0, _mm256_loadu_ps(v));
  _mm256_storeu_ps(p + i0 + 8, _mm256_loadu_ps(v + 8));
}
static inline void st_lanes(double* p, int64_t i0, const double* v) {
  for (int h = 0; h < 4; ++h) _mm256_storeu_pd(p + i0 + 4 * h, _mm256_loadu_pd(v + 4 * h));
}
// bf16: the same rounding as st(), in AVX2 integer operations. GCC does not vectorise the scalar
// form (the NaN select and the narrowing to 16 bits), and then the rounding costs more than the
// memory traffic: eval of a bf16 (64, 256, 14, 14) tensor ran 15-25 % behind torch.nn.
// bf16_rounded_high: u + 0x7fff + (bit 16 of u) for the float32 bits u of f, st()'s rounding to
// nearest even with the bf16 bits in each lane's high half. The parity bit is taken by a compare
// (any vector ALU port) rather than a shift: on Zen 3 the shifts, the widening and the narrowing
// shuffles share two ports, which bound the bf16 passes (docs/benchmark_rounds.md, thirty-third session).
// Not for NaNs (st() stores them as 0x7fc0).
static inline __m256i bf16_rounded_high(__m256 f) {
  const __m256i u = _mm256_castps_si256(f), bit = _mm256_set1_epi32(0x10000);
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(u, bit), bit);  // -1 where bit 16 is set
  return _mm256_sub_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
}
// bf16_bits: the bf16 bits of 8 float32 values, in the low half of each 32-bit lane.
static inline __m256i bf16_bits(__m256 f) {
  const __m256i rounded = _mm256_srli_epi32(bf16_rounded_high(f), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
// Whether either of two vectors holds a NaN (one compare for both).
static inline bool any_nan(__m256 a, __m256 b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) != 0; }
// 16 values from two vectors in memory order (lo: values 0-7), rounded as st(): one pack and one
// permute for both, and one NaN test where bf16_bits takes a compare and a blend per 8.
static inline void st16(bf16* p, __m256 lo, __m256 hi) {
  __m256i a, b;
  if (any_nan(lo, hi)) {
    a = bf16_bits(lo), b = bf16_bits(hi);
  } else {
    a = _mm256_srli_epi32(bf16_rounded_high(lo), 16), b = _mm256_srli_epi32(bf16_rounded_high(hi), 16);
  }
  // packus interleaves 128-bit lanes (a0-3 b0-3 a4-7 b4-7); the permute restores the order.
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8));
}
static inline void st_lanes(bf16* p, int64_t i0, const float* v) {
  st16(p + i0, _mm256_loadu_ps(v), _mm256_loadu_ps(v + 8));
}

// One vector of 8 values: loaded as float32, stored from float32 (bf16 rounded as st()). bf16
// values are widened by one byte shuffle of the 16 bytes broadcast to both lanes (the broadcast
// is a load): vpmovzxwd and a shift took two operations on Zen 3's two shift/shuffle ports, which
// bound the bf16 statistics (docs/benchmark_rounds.md, thirty-third session).
static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 ld8(const bf16* p) {
  const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p));
  const __m256i up = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1, 8, 9, -1, -1, 10,
                                      11, -1, -1, 12, 13, -1, -1, 14, 15);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(b, up));
}
static inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void st8(bf16* p, __m256 v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  if (!_mm256_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80)) {  // as st16: no NaN or denormal among the 8
    _mm_storeu_si128((__m128i*)p, (__m128i)_mm256_cvtneps_pbh(v));
    return;
  }
#endif
  const __m256i b = bf16_bits(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0xD8);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}

// float16: F16C's conversions (every AVX2 CPU has them), exact widening and round-to-nearest-even
// narrowing with subnormals kept, as the scalar (_Float16) conversion; GCC converted value by
// value, which made float16 BN on the CPU 7-11x slower than torch.nn's.
#if defined(__F16C__)
static inline __m256 ld8(const _Float16* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline void st8(_Float16* p, __m256 v) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void st_lanes(_Float16* p, int64_t i0, const float* v) {
  st8(p + i0, _mm256_loadu_ps(v));
  st8(p + i0 + 8, _mm256_loadu_ps(v + 8));
}
constexpr bool kF16c = true;
#else
constexpr bool kF16c = false;  // float16 keeps the portable loops
#endif

// The two elementwise formulas on 8 float32 lanes, rounded as their portable forms (GCC contracts
// those the same way): y = (x - h)·a + b in one FMA, and dx = k1·(dy - k4) + (k2·(x - h) + k3) in
// two. dy's channel mean (k4, rounded to float32) comes off dy before the product: k1·dy and the
// constant then no longer cancel where dy is nearly constant, so a channel constant in both x and dy
// gets dx = 0 exactly (the old k1·dy + ... + k3 was off by the rounding of k1·dy, 1e-4 at
// invstd = 1/sqrt(eps)), at the same four operations.
static inline __m256 affine8(__m256 x, __m256 h, __m256 a, __m256 b) {
  return _mm256_fmadd_ps(_mm256_sub_ps(x, h), a, b);
}
static inline __m256 grad_input8(__m256 dy, __m256 x, __m256 h, __m256 k1, __m256 k2, __m256 k3, __m256 k4) {
  return _mm256_fmadd_ps(k1, _mm256_sub_ps(dy, k4), _mm256_fmadd_ps(k2, _mm256_sub_ps(x, h), k3));
}

// Whether values of S have the explicit AVX2 forms (float32, bf16 and float16 values, float32
// arithmetic).
template <typename S>
constexpr bool kAvx2Rows = std::is_same<S, float>::value || std::is_same<S, bf16>::value ||
                           (kF16c && std::is_same<S, _Float16>::value);

// dst[0:8] += v, in float64.
static inline void add_to_f64(double* dst, __m256 v) {
  _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  _mm256_storeu_pd(dst + 4, _mm256_add_pd(_mm256_loadu_pd(dst + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// 16-bit storage types (bf16, float16): float32 arithmetic, vector loads and stores that convert.
template <typename S>
constexpr bool kHalf16 = std::is_same<S, bf16>::value || std::is_same<S, _Float16>::value;

#if defined(__AVX512F__)
// 16 bf16 values as one float32 vector in memory order, and back with st()'s rounding (the same
// integer operations as bf16_bits, 16 lanes wide; vpmovdw narrows without a pack and a permute),
// or vcvtneps2bf16 (AVX512-BF16) where no value is a NaN or a denormal, which that instruction
// would encode or flush differently from torch (bf16_pack16).
static inline __m512 ld16(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m256i bf16_pack16(__m512 f) {
#if defined(__AVX512BF16__)
  // vcvtneps2bf16 rounds to nearest even as the integer form below does, but reads denormals as
  // zero (torch keeps them), and keeps a NaN's sign and payload where st() and the integer form
  // store every NaN as 0x7fc0: vectors holding either kind (one fpclass test: quiet NaN, denormal,
  // signalling NaN) take the integer form. Eval of a bf16 channels-last (128, 16, 32, 32): 0.68 of the time.
  if (!_mm512_fpclass_ps_mask(f, 0x01 | 0x20 | 0x80)) return (__m256i)_mm512_cvtneps_pbh(f);
#endif
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i bits = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(bits);
}
static inline void st16(bf16* p, __m512 f) { _mm256_storeu_si256((__m256i*)p, bf16_pack16(f)); }
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline void st16(float* p, __m512 f) { _mm512_storeu_ps(p, f); }
static inline __m512 ld16(const _Float16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m256i f16_pack16(__m512 f) {
  return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline void st16(_Float16* p, __m512 f) { _mm256_storeu_si256((__m256i*)p, f16_pack16(f)); }
// st16 of 16-bit values around the caches (no read-for-ownership of the destination line) where p
// is 32-byte aligned, as st_lanes_stream below; the writer issues _mm_sfence() before others read.
static inline void stream16(__m256i* p, __m256i v) {
  if (((uintptr_t)p & 31) != 0)
    _mm256_storeu_si256(p, v);
  else
    _mm256_stream_si256(p, v);
}
static inline void st16_stream(bf16* p, __m512 f) { stream16((__m256i*)p, bf16_pack16(f)); }
static inline void st16_stream(_Float16* p, __m512 f) { stream16((__m256i*)p, f16_pack16(f)); }
// st16 or st16_stream, chosen at compile time.
template <bool kStream>
static inline __attribute__((always_inline)) void st16_to(bf16* p, __m512 f) {
  if (kStream)
    st16_stream(p, f);
  else
    st16(p, f);
}
// 32 bf16 values from two vectors (values 0-15 in f0, 16-31 in f1), rounded as st16: where neither
// holds a NaN or a denormal (bf16_pack16's test), both in one vcvtne2ps2bf16 (AVX512-BF16). On
// Zen 4 a vcvtneps2bf16 per 16 values bound the bf16 elementwise passes: a bf16 eval of
// (128, 16, 32, 32) took longer than the float32 one (docs/benchmark_rounds.md, twenty-first session).
// With kStream, a line-aligned p is written around the caches (as stream16).
template <bool kStream>
static inline __attribute__((always_inline)) void st32(bf16* p, __m512 f0, __m512 f1) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  if (!(_mm512_fpclass_ps_mask(f0, 0x01 | 0x20 | 0x80) | _mm512_fpclass_ps_mask(f1, 0x01 | 0x20 | 0x80))) {
    const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);
    if (kStream && ((uintptr_t)p & 63) == 0)
      _mm512_stream_si512((__m512i*)p, v);
    else
      _mm512_storeu_si512((void*)p, v);
    return;
  }
#endif
  st16_to<kStream>(p, f0);
  st16_to<kStream>(p + 16, f1);
}
// 32 bf16 values as eo_split (below) splits them: the float32 values at even offsets, and at odd ones.
struct EvenOdd {
  __m512 even, odd;
};
#if defined(__AVX512BF16__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
// Whether bf16 rows with one set of coefficients (NCL rows) take the even/odd pair form below.
constexpr bool kBf16EvenOdd = true;
// 32 bf16 values (one 64-byte load) as two float32 vectors without a widening shuffle: the values
// at even offsets (0, 2, ..., 30: the low half of each 32-bit lane, shifted up) and at odd ones
// (the high half, masked). ld16 widens 16 values per vpmovzxwd, a cross-lane shuffle: with
// vcvtne2ps2bf16 per pair, three shuffles per 32 values bound a bf16 NCL eval on Zen 4, at 0.49-0.59
// of a bf16 copy_ (docs/benchmark_rounds.md, thirty-second session). Only for elementwise work whose
// coefficients are the same in every lane: the values come out of memory order.
static inline EvenOdd eo_split(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)))};
}
// Word k of the interleave: even result k / 2 (words 0-15 of vcvtne2ps2bf16's output) or odd
// result k / 2 (words 16-31).
alignas(64) static const uint16_t kInterleaveWords[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
// st32 of results in eo_split's order: one vcvtne2ps2bf16 and one vpermw put them back in memory
// order, rounded as st32 rounds them (the same bits). False, having stored nothing, where a value
// is a NaN or a denormal (st32's test): the caller then stores the pair in memory order (st32).
template <bool kStream>
static inline __attribute__((always_inline)) bool st32_eo(bf16* p, EvenOdd r) {
  if (_mm512_fpclass_ps_mask(r.even, 0x01 | 0x20 | 0x80) | _mm512_fpclass_ps_mask(r.odd, 0x01 | 0x20 | 0x80))
    return false;
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(r.odd, r.even);
  const __m512i v = _mm512_permutexvar_epi16(_mm512_load_si512((const void*)kInterleaveWords), packed);
  if (kStream && ((uintptr_t)p & 63) == 0)
    _mm512_stream_si512((__m512i*)p, v);
  else
    _mm512_storeu_si512((void*)p, v);
  return true;
}
#else
constexpr bool kBf16EvenOdd = false;
static inline EvenOdd eo_split(__m512i) { return {_mm512_setzero_ps(), _mm512_setzero_ps()}; }  // never called
template <bool kStream>
static inline bool st32_eo(bf16*, EvenOdd) { return false; }
#endif
static inline __m512i ld32_raw(const bf16* p) { return _mm512_loadu_si512((const void*)p); }
// Pins a loaded vector to a register (an empty asm that may change it): GCC otherwise folds a
// vector loaded once for several blocks back into each use as a memory operand, one load per use.
static inline void in_register(__m512& v) { __asm__("" : "+v"(v)); }
static inline __m512 affine16(__m512 x, __m512 h, __m512 a, __m512 b) {
  return _mm512_fmadd_ps(_mm512_sub_ps(x, h), a, b);
}
static inline __m512 grad_input16(__m512 dy, __m512 x, __m512 h, __m512 k1, __m512 k2, __m512 k3, __m512 k4) {
  return _mm512_fmadd_ps(k1, _mm512_sub_ps(dy, k4), _mm512_fmadd_ps(k2, _mm512_sub_ps(x, h), k3));
}
// affine16 and grad_input16 over 32 values as loaded (ld32_raw), in eo_split's order: the pair
// forms of the row walk (bf16_row_in_pairs) and the lines walk (lines_run).
struct Raw2 {
  __m512i dy, x;
};
static inline EvenOdd affine_eo(__m512i raw, __m512 h, __m512 a, __m512 b) {
  const EvenOdd v = eo_split(raw);
  return {affine16(v.even, h, a, b), affine16(v.odd, h, a, b)};
}
static inline EvenOdd grad_input_eo(Raw2 raw, __m512 h, __m512 k1, __m512 k2, __m512 k3, __m512 k4) {
  const EvenOdd d = eo_split(raw.dy), v = eo_split(raw.x);
  return {grad_input16(d.even, v.even, h, k1, k2, k3, k4), grad_input16(d.odd, v.odd, h, k1, k2, k3, k4)};
}
// One bf16 row of len >= 16 values, vec(i) giving the float32 results for values i..i+15: from the
// first 64-byte line of q on in pairs of vectors (st32), then single vectors, the last moved back
// to end at len (as overlapped). Rows under 64 values go in single vectors only: pairs there would
// store across two lines at almost every row (eval of bf16 (32, 512, 7, 7) took 1.3-1.8x the time
// in pairs from the row's start). vec is a lambda taking its state by value: with lambdas by
// reference and a run-time streaming flag, GCC kept the coefficients on the stack and called the
// single-vector body, and the rows took 1.05-1.5x the time of the single-vector loop.
// load and pair, where given (kBf16EvenOdd builds, rows of one channel): load(i) reads values
// i..i+31 as they are in memory, pair(loaded) gives their results in eo_split's order, stored by
// st32_eo (a pair it declines goes through vec as before). The loads run two pairs ahead of the
// stores: a load issued after a store whose address matches it in the low 12 bits waits for that
// store (4K aliasing), and an output 64 or 128 bytes past the input modulo 4 KiB (any two
// tensors' placement may give that) made the pair form slower than vec's in a stand-alone test;
// two ahead, it ran at 0.81-0.89 of vec's time at every offset.
template <bool kStream, typename Vec, typename Load = std::nullptr_t, typename Pair = std::nullptr_t>
static inline __attribute__((always_inline)) void bf16_row_in_pairs(bf16* q, int64_t len, Vec vec,
                                                                    Load load = nullptr, Pair pair = nullptr) {
  int64_t i = 0;
  if (len >= 64) {
    const int64_t head = (int64_t)((64 - ((uintptr_t)q & 63)) & 63) / 2;  // values before q's first line
    if (head > 0) st16_to<kStream>(q, vec(0));
    if (head > 16) st16_to<kStream>(q + head - 16, vec(head - 16));
    i = head;
    if constexpr (!std::is_same<Pair, std::nullptr_t>::value) {
      if (i + 32 <= len) {
        auto now = load(i), next = i + 64 <= len ? load(i + 32) : now;
        for (; i + 32 <= len; i += 32) {
          const auto after = i + 96 <= len ? load(i + 64) : next;  // never past the row
          if (!st32_eo<kStream>(q + i, pair(now))) st32<kStream>(q + i, vec(i), vec(i + 16));
          now = next, next = after;
        }
      }
    } else {
      for (; i + 32 <= len; i += 32) st32<kStream>(q + i, vec(i), vec(i + 16));
    }
    if (i == len) return;
  }
  const int64_t last = len - 16;
  for (; i < last; i += 16) st16_to<kStream>(q + i, vec(i));
  st16_to<kStream>(q + last, vec(last));
}
// y = affine16(x) over an NCL row (one channel's coefficients h, a, b in every lane).
template <bool kStream>
static inline __attribute__((always_inline)) void bf16_affine_row(const bf16* p, bf16* q, int64_t len, __m512 h,
                                                                  __m512 a, __m512 b) {
  const auto vec = [=](int64_t i) { return affine16(ld16(p + i), h, a, b); };
  if constexpr (kBf16EvenOdd) {
    if (len >= 64) {  // rows in pairs (shorter ones go as before: a separate loop kept them at their speed)
      bf16_row_in_pairs<kStream>(
          q, len, vec, [=](int64_t i) { return ld32_raw(p + i); },
          [=](__m512i raw) { return affine_eo(raw, h, a, b); });
      return;
    }
  }
  bf16_row_in_pairs<kStream>(q, len, vec);
}
// dx = grad_input16(dy, x) over an NCL row.
template <bool kStream>
static inline __attribute__((always_inline)) void bf16_grad_input_row(const bf16* g, const bf16* p, bf16* q,
                                                                      int64_t len, __m512 h, __m512 k1, __m512 k2,
                                                                      __m512 k3, __m512 k4) {
  const auto vec = [=](int64_t i) { return grad_input16(ld16(g + i), ld16(p + i), h, k1, k2, k3, k4); };
  if constexpr (kBf16EvenOdd) {
    if (len >= 64) {  // as bf16_affine_row
      bf16_row_in_pairs<kStream>(
          q, len, vec, [=](int64_t i) { return Raw2{ld32_raw(g + i), ld32_raw(p + i)}; },
          [=](Raw2 raw) { return grad_input_eo(raw, h, k1, k2, k3, k4); });
      return;
    }
  }
  bf16_row_in_pairs<kStream>(q, len, vec);
}
// The same over a channels-last row of len = C channels, the coefficients per channel (len values each).
static inline void bf16_affine_row(const bf16* p, bf16* q, int64_t len, const float* h, const float* a,
                                   const float* b) {
  bf16_row_in_pairs<false>(q, len, [=](int64_t i) {
    return affine16(ld16(p + i), _mm512_loadu_ps(h + i), _mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
  });
}
static inline void bf16_grad_input_row(const bf16* g, const bf16* p, bf16* q, int64_t len, const float* h,
                                       const float* k1, const float* k2, const float* k3, const float* k4) {
  bf16_row_in_pairs<false>(q, len, [=](int64_t i) {
    return grad_input16(ld16(g + i), ld16(p + i), _mm512_loadu_ps(h + i), _mm512_loadu_ps(k1 + i),
                        _mm512_loadu_ps(k2 + i), _mm512_loadu_ps(k3 + i), _mm512_loadu_ps(k4 + i));
  });
}
#endif

// 16 bf16 values (one 32-byte load) as two float32 vectors without a widening shuffle: the values
// at even offsets (0, 2, ..., 14: the low half of each 32-bit lane, shifted up) and at odd ones (the
// high half, masked). Elementwise work whose coefficients are the same for all 16 (an NCL row), or
// whose coefficients are laid out in the same order (to_even_odd_order), does not mind the order,
// and st16_eo puts the rounded halves back in memory order with a shift, a mask and an or. Why: on
// AVX2 CPUs the widening (two unpacks or vpmovzxwd per 16 values), the rounding's shifts and the
// narrowing pack all issue on the two vector shift/shuffle ports of Zen 3, which bounded bnlab's bf16
// passes (seven such operations per 16 values in the unpacked form before this one, two here;
// benchmarks/bf16_avx2_forms.cpp, docs/benchmark_rounds.md, thirty-third session).
struct EvenOdd8 {
  __m256 even, odd;
};
static inline EvenOdd8 ld16_eo(const bf16* p) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)p);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
          _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)))};
}
// Results in ld16_eo's order, stored in memory order with st()'s rounding. Where either half holds
// a NaN, bf16_bits, which stores it as st() does.
static inline void st16_eo(bf16* p, EvenOdd8 r) {
  __m256i v;
  if (any_nan(r.even, r.odd))
    v = _mm256_or_si256(bf16_bits(r.even), _mm256_slli_epi32(bf16_bits(r.odd), 16));
  else
    v = _mm256_or_si256(_mm256_srli_epi32(bf16_rounded_high(r.even), 16),
                        _mm256_and_si256(bf16_rounded_high(r.odd), _mm256_set1_epi32((int)0xffff0000u)));
  _mm256_storeu_si256((__m256i*)p, v);
}
#endif

// Non-temporal variant for outputs too large to stay in cache: a float32 vector whose address is
// 32-byte aligned is written around the caches (no read-for-ownership of the destination line);
// anything else is stored as usual. The writer issues _mm_sfence() before other threads read.
template <typename S, typename F>
static inline void st_lanes_stream(S* p, int64_t i0, const F* v) { st_lanes(p, i0, v); }
#ifdef __AVX2__
static inline void st_lanes_stream(float* p, int64_t i0, const float* v) {
  float* q = p + i0;
  if (((uintptr_t)q & 31) != 0) {
    st_lanes(p, i0, v);
    return;
  }
  _mm256_stream_ps(q, _mm256_loadu_ps(v));
  _mm256_stream_ps(q + 8, _mm256_loadu_ps(v + 8));
}
static inline void store_fence() { _mm_sfence(); }
#else
static inline void store_fence() {}
#endif

template <typename S, typename F>
static inline void store_lanes(S* p, int64_t i0, const F* v, bool stream) {
  if (stream)
    st_lanes_stream(p, i0, v);
  else
    st_lanes(p, i0, v);
}

// A per-channel parameter or statistic of any floating dtype (weight, bias, running buffers).
static inline double ldp(const void* p, int dt, int64_t i, double fill) {
  if (p == nullptr) return fill;
  switch (dt) {
    case kF32: return ((const float*)p)[i];
    case kF64: return ((const double*)p)[i];
    case kBF16: return ld((const bf16*)p, i);
    default: return (double)((const _Float16*)p)[i];
  }
}
static inline void stp(void* p, int dt, int64_t i, double v) {
  switch (dt) {
    case kF32: ((float*)p)[i] = (float)v; break;
    case kF64: ((double*)p)[i] = v; break;
    case kBF16: st((bf16*)p, i, (float)v); break;
    default: ((_Float16*)p)[i] = (_Float16)v; break;
  }
}

// ---- per-channel statistics ----------------------------------------------------------------
struct Part {  // (count, mean, M2) of a piece of a channel
  double n, mean, m2;
};

// Chan et al.: fold (nb, mb, qb) into a. Equal means merge exactly (a constant channel stays exact).
// The two FMAs are written out: left to GCC's contraction, the mean's multiply and add were fused
// or not depending on what else the caller inlined (a change of the bf16 chunk_normalize moved the
// waves walk's bf16 means by 1-2 ulp on 2+ threads; docs/benchmark_rounds.md, twenty-first session).
// These are the forms GCC had chosen at every call site before.
static inline void chan(Part& a, double nb, double mb, double qb) {
  if (nb == 0) return;
  if (a.n == 0) { a = {nb, mb, qb}; return; }
  double n = a.n + nb, d = mb - a.mean;
  a.mean = std::fma(d, nb / n, a.mean);
  a.m2 += std::fma(d * d, a.n / n * nb, qb);
  a.n = n;
}

// Centring constants of the elementwise phase, as bnlab.stats.split_mean: x - hi is exact near the
// mean, lo = mean - hi carries the digits F cannot hold.
template <typename F> struct Split {
  F hi;
  double lo;
};
template <typename F> static inline Split<F> split(double mean) {
  F hi = (F)mean;
  return {hi, (double)(F)(mean - (double)hi)};
}

// Quotients x / d by a count d that one loop over channels shares (a block's rows, the batch's
// values). A float64 division costs the vector unit 8-16 cycles per 4 lanes, and with two values
// per channel ((2, 8192)) the training step divided four times per channel. Where d is a power of
// two, 1/d is exact, and x·(1/d) rounds the same real number as x/d: the same value, subnormals,
// signs and NaNs included. It is written as fma(x, 1/d, -0.0), which is x·(1/d) rounded (adding
// -0.0 changes no value, not even +0): GCC contracts a plain product into a following sum
// (-ffp-contract=fast, C++'s default), and where x/d is subnormal and inexact, q + k fused would
// skip q's own rounding. (Elsewhere the product is exact, fused or not.)
struct ByCount {  // x / d, divided
  double d;
  double operator()(double x) const { return x / d; }
};
struct ByPowerOfTwo {  // x / d for d a power of two, as x·(1/d)
  double r;
  double operator()(double x) const { return std::fma(x, r, -0.0); }
};
// body(div), div(x) the quotient x / d, as ByPowerOfTwo where d is a power of two from 1 to 2^1000
// (body is instantiated for both, so each loop is vectorised without a select).
template <typename Body>
static inline void with_count(double d, Body&& body) {
  int e = 0;
  if (d >= 1 && d <= 0x1p1000 && std::frexp(d, &e) == 0.5)
    body(ByPowerOfTwo{1.0 / d});
  else
    body(ByCount{d});
}

// One value of dx = kk·(dy - gh) + (a·(x - hi) + cc) (grad_coef's coefficients): two FMAs, as
// grad_input8 and grad_input16 round it, the parentheses fixing which products GCC contracts.
template <typename F> static inline F grad_input_value(F dy, F x, F hi, F kk, F a, F cc, F gh) {
  return kk * (dy - gh) + (a * (x - hi) + cc);
}

// ---- the two layouts -----------------------------------------------------------------------
// NCL: x[n][c][l], contiguous (N, C, *) with L = prod(spatial) > 1.
// NLC: x[m][c], M rows of C channels: (N, C) inputs and channels_last (N, *, C) memory.
struct Layout {
  int64_t N, C, L;  // NLC: N = M rows, L = 1
  // chunk decomposition of one NCL channel
  int64_t segs;     // segments per row (L >= kChunk), else 1
  int64_t rows;     // rows per chunk (L < kChunk), else 1
  int64_t nch;      // chunks per channel
};

static Layout make_layout(int64_t N, int64_t C, int64_t L) {
  Layout g{N, C, L, 1, 1, 0};
  if (L >= kChunk) {
    g.segs = (L + kChunk - 1) / kChunk;
    g.nch = N * g.segs;
  } else {
    g.rows = kChunk / L > 0 ? kChunk / L : 1;
    g.nch = (N + g.rows - 1) / g.rows;
  }
  return g;
}

struct Chunk {
  int64_t off;   // element offset of the first value
  int64_t rows;  // rows in the chunk, each `len` contiguous values, `stride` apart
  int64_t len;
  int64_t stride;
};

static inline Chunk chunk_of(const Layout& g, int64_t c, int64_t j) {
  if (g.L >= kChunk) {
    int64_t n = j / g.segs, s = j % g.segs;
    int64_t l0 = s * g.L / g.segs, l1 = (s + 1) * g.L / g.segs;
    return {(n * g.C + c) * g.L + l0, 1, l1 - l0, 0};
  }
  int64_t n0 = j * g.rows;
  int64_t r = g.N - n0 < g.rows ? g.N - n0 : g.rows;
  return {(n0 * g.C + c) * g.L, r, g.L, g.C * g.L};
}

// Scratch buffers owned by the calling thread and reused across calls (no allocation per call).
// Cache-line aligned: the rows of C channels load their coefficients (C-long arrays in here) once
// per vector, and malloc's 16-byte alignment made every other 32-byte load straddle two lines,
// which cost a channels-last eval 10-15 % depending on where the buffer happened to land.
struct Scratch {
  static constexpr size_t kAlign = 64;
  double* p = nullptr;
  size_t cap = 0;
  double* get(size_t n) {
    if (n > cap) {
      std::free(p);
      const size_t bytes = (n * sizeof(double) + kAlign - 1) / kAlign * kAlign;
      p = (double*)std::aligned_alloc(kAlign, bytes);
      cap = p ? n : 0;
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};
thread_local Scratch tls_scratch;

static inline int64_t split_at(int64_t total, int t, int T) { return total * t / T; }
// Thread t's first channel of T where the threads split rows of C channels among them (the narrow
// NLC walks, the centred backward's dy shifts): a static share rounded down to a multiple of 16
// channels, so that two threads never write one cache line of float32 values (t = T: C).
static inline int64_t channel_share(int64_t C, int t, int T) { return t >= T ? C : split_at(C, t, T) / 16 * 16; }

// body() on a team of nt threads (an OpenMP parallel region), or for nt <= 1 on the calling thread
// alone, outside any region. The body's worksharing and barriers (omp for, omp barrier,
// omp_get_thread_num) mean the same on one thread either way, but libgomp makes a wake-up system
// call (futex) at every barrier of a team, even a team of one: three per training forward and
// backward of a small input, each as long as a small kernel's work (docs/benchmark_rounds.md,
// thirty-seventh session). Small inputs run on one thread (cpu.PARALLEL_MIN_NUMEL).
// How the old code's speed is kept: the body runs in a function of its own, called from both
// places (inlined twice, GCC's growth limits stopped inlining the row functions into it: the
// normalize pass of a (64, 256, 14, 14) eval took 1.11-1.29x its time), and the bodies capture
// by value ([=]) into a local copy, as OpenMP's outlining passed them (captured by reference,
// every bf16 store, which may alias anything, made the loops load them again: bf16 eval 1.06x).
template <typename Body>
__attribute__((noinline)) static void region_body(const Body& body) {
  const Body local = body;
  local();
}
// Inside an enclosing OpenMP region (a caller's own team) the body's worksharing and barriers
// would bind to that team, so there a team of one is made as before.
template <typename Body>
static inline void parallel_region(int nt, Body&& body) {
  if (nt <= 1 && !omp_in_parallel()) {
    region_body(body);
    return;
  }
#pragma omp parallel num_threads(nt)
  region_body(body);
}

// The items [first, last) of count that the calling thread of an OpenMP team takes: a static
// share, so that a reduction and the elementwise pass after it give the same thread the same
// data (the flat walk's blocks, the per-channel walk's channels). Its second pass can then walk its
// share from the last item read to the first, which are still in its L2 (the flat walk always;
// the per-channel walk where last_first_min_bytes says). (Such sums do not depend on the share:
// each item's sum is kept apart and folded in item order.)
struct BlockRange {
  int64_t first, last;
};
static inline BlockRange thread_blocks(int64_t count) {
  const int t = omp_get_thread_num(), team = omp_get_num_threads();
  return {split_at(count, t, team), split_at(count, t + 1, team)};
}

// A large fresh output (glibc maps allocations above its mmap threshold, at most 32 MiB, anew each
// time, and trims freed memory at the top of its heap back to the OS) costs one page fault per
// 4 KiB page when first written, which on a virtual machine takes longer than writing the data.
// Asking for transparent huge pages on the 2 MiB-aligned interior of the output cuts the faults
// 512-fold; every output of 4 MiB or more has such an interior, and one of 2-4 MiB has one when
// it happens to straddle a 2 MiB boundary. (Measured, training steps of BatchNorm2d on 12.8 MB
// and 25.7 MB inputs: 3,010 and 9,168 page faults per step with the hint from 32 MiB up, 0-600
// with it from 4 MiB: docs/benchmarks.md.) A hint only: it changes no data and is ignored where
// THP is off. Pages already present (reused heap memory) are unaffected.
static void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = (uintptr_t)1 << 21;
  if (p == nullptr || bytes < (int64_t)kHuge) return;
  uintptr_t lo = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1), hi = ((uintptr_t)p + (uintptr_t)bytes) & ~(kHuge - 1);
  if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

#include "cpu_kernels_sums.inc"
#include "cpu_kernels_ncl.inc"
#include "cpu_kernels_ncl_tails.inc"
#include "cpu_kernels_coef.inc"
#include "cpu_kernels_eval_cache.inc"
#include "cpu_kernels_ncl_lines.inc"
#include "cpu_kernels_ncl_channels.inc"
#include "cpu_kernels_ncl_passes.inc"
#include "cpu_kernels_ncl_flat.inc"
#include "cpu_kernels_ncl_groups.inc"
#include "cpu_kernels_waves.inc"
#include "cpu_kernels_nlc_half.inc"
#include "cpu_kernels_nlc_short.inc"
#include "cpu_kernels_nlc_rows.inc"
#include "cpu_kernels_nlc_tree.inc"
#include "cpu_kernels_nlc.inc"
#include "cpu_kernels_api.inc"
#if !defined(BNLAB_PART_DTYPE)  // no dtype part needs them
#include "cpu_kernels_relu.inc"
#endif
#ifdef BNLAB_PART_MAIN
#include "cpu_kernels_parts.inc"
#endif
#if defined(BNLAB_PYTHON_MODULE) && !defined(BNLAB_PART_DTYPE)  // the glue: the main part's (or the whole build's)
#if defined(__linux__)
#include "cpu_kernels_pool.inc"
#endif
#include "cpu_kernels_py_tensors.inc"
#include "cpu_kernels_py_attrs.inc"
#include "cpu_kernels_py_eval.inc"
#include "cpu_kernels_py_train.inc"
#include "cpu_kernels_py_device.inc"
#include "cpu_kernels_py_call.inc"
#include "cpu_kernels_py_launch.inc"
#include "cpu_kernels_py.inc"
#endif
