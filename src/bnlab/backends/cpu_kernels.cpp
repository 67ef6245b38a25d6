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

}  // namespace

#include "cpu_kernels_types.inc"
#include "cpu_kernels_avx512.inc"
#include "cpu_kernels_stores.inc"
#include "cpu_kernels_stats.inc"
#include "cpu_kernels_layout.inc"
#include "cpu_kernels_threads.inc"
#include "cpu_kernels_sums.inc"
#include "cpu_kernels_ncl.inc"
#include "cpu_kernels_ncl_chunk_grad.inc"
#include "cpu_kernels_grad_shifts.inc"
#include "cpu_kernels_grad_coef.inc"
#include "cpu_kernels_stream_bounds.inc"
#include "cpu_kernels_ncl_tails.inc"
#include "cpu_kernels_coef.inc"
#include "cpu_kernels_eval_cache.inc"
#include "cpu_kernels_ncl_lines.inc"
#include "cpu_kernels_ncl_channels.inc"
#include "cpu_kernels_ncl_by_sample.inc"
#include "cpu_kernels_ncl_passes.inc"
#include "cpu_kernels_ncl_flat.inc"
#include "cpu_kernels_ncl_groups.inc"
#include "cpu_kernels_waves.inc"
#include "cpu_kernels_nlc_half.inc"
#include "cpu_kernels_nlc_short.inc"
#include "cpu_kernels_nlc_rows.inc"
#include "cpu_kernels_nlc_row_forms.inc"
#include "cpu_kernels_nlc_affine_rows.inc"
#include "cpu_kernels_nlc_grad_groups.inc"
#include "cpu_kernels_nlc_grad_rows.inc"
#include "cpu_kernels_nlc_tree.inc"
#include "cpu_kernels_nlc.inc"
#include "cpu_kernels_nlc_choices.inc"
#include "cpu_kernels_nlc_forward.inc"
#include "cpu_kernels_nlc_backward.inc"
#include "cpu_kernels_nlc_passes.inc"
#include "cpu_kernels_dispatch.inc"
#include "cpu_kernels_own_coef.inc"
#include "cpu_kernels_fixups.inc"
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
#include "cpu_kernels_py_backward.inc"
#include "cpu_kernels_py_device.inc"
#include "cpu_kernels_py_call.inc"
#include "cpu_kernels_py_launch.inc"
#include "cpu_kernels_py.inc"
#endif
