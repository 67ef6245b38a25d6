// bnlab's compiled eval kernel called from C on buffers held across calls, beside a memcpy of the
// same bytes split across the same threads: the kernel's own speed, without Python, torch or an
// output allocation.
//
// Claim measured (docs/benchmarks.md, "Where bnlab still loses or only ties"; docs/benchmark_rounds.md,
// thirty-eighth session): at (128, 64, 8, 8) and (8192, 100) float32 the eval kernel runs at
// 0.86-0.95 of a two-thread memcpy (one thread 0.93-1.00), so what keeps the module call's eval
// below 0.90 of torch's copy_ there is the call around the kernel, not the kernel.
//
// bn_eval is the module's C entry point (cpu_kernels_api.inc); the module also holds its Python
// bindings, so the program links libpython for their symbols (none of them is called).
// Arguments: the module's path (bnlab.backends.cpu_build.library_path()), layout (0 NCL, 1 NLC),
// N, C, L, threads. Medians of 41 samples, each repeating the call for about 200 MB of traffic.
//
//     g++ -O2 -fopenmp -o /tmp/eval_kernel_from_c benchmarks/eval_kernel_from_c.cpp -ldl \
//         -Wl,--no-as-needed "$(python3 -c 'import sysconfig as s; print(s.get_config_var("LIBDIR"))')/libpython3.11.so"
//     /tmp/eval_kernel_from_c <module.so> 1 8192 100 1 2
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using EvalFn = int (*)(const void* x, void* y, int dt, int layout, int64_t N, int64_t C, int64_t L, const void* rm,
                       int rmdt, const void* rv, int rvdt, const void* w, int wdt, const void* b, int bdt, double eps,
                       int nt);

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s <module.so> <layout 0|1> <N> <C> <L> <threads>\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW);
  if (lib == nullptr) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  const auto eval = (EvalFn)dlsym(lib, "bn_eval");
  if (eval == nullptr) {
    std::fprintf(stderr, "module: %s has no bn_eval (not bnlab's compiled CPU kernels?)\n", argv[1]);
    return 1;
  }
  const int layout = std::atoi(argv[2]), nt = std::atoi(argv[6]);
  const int64_t N = std::atoll(argv[3]), C = std::atoll(argv[4]), L = std::atoll(argv[5]), n = N * C * L;
  if ((layout != 0 && layout != 1) || N < 1 || C < 1 || L < 1 || nt < 1 || (layout == 1 && L != 1)) {
    std::fprintf(stderr, "expected layout 0 (NCL) or 1 (NLC, L = 1) and positive N, C, L, threads; "
                 "got %s %s %s %s %s\n", argv[2], argv[3], argv[4], argv[5], argv[6]);
    return 2;
  }
  float* x = (float*)std::aligned_alloc(64, (size_t)(n * 4 + 63) / 64 * 64);
  float* y = (float*)std::aligned_alloc(64, (size_t)(n * 4 + 63) / 64 * 64);
  for (int64_t i = 0; i < n; ++i) x[i] = (float)(i % 7) * 0.3f, y[i] = 0;
  std::vector<float> rm(C, 0.1f), rv(C, 2.0f), w(C, 1.5f), b(C, 0.2f);
  const int reps = (int)(200000000 / (n * 8) + 1);
  std::vector<double> kernel, copy;
  for (int round = 0; round < 41; ++round) {
    for (int which = 0; which < 2; ++which) {
      const auto start = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) {
        if (which == 0) {
          eval(x, y, 0, layout, N, C, L, rm.data(), 0, rv.data(), 0, w.data(), 0, b.data(), 0, 1e-5, nt);
        } else {
#pragma omp parallel num_threads(nt)
          {
            const int T = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t a0 = n * t / T, a1 = n * (t + 1) / T;
            std::memcpy(y + a0, x + a0, (size_t)(a1 - a0) * 4);
          }
        }
      }
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      (which == 0 ? kernel : copy).push_back(us / reps);
    }
  }
  const double k = median(kernel), c = median(copy);
  std::printf("layout %d (%lld, %lld, %lld), %d thread(s): bn_eval %.1f us, memcpy %.1f us, memcpy / bn_eval %.3f\n",
              layout, (long long)N, (long long)C, (long long)L, nt, k, c, c / k);
  return 0;
}
