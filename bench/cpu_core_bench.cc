// The CPU kernel core alone (no TensorFlow), timed on buffers that are allocated and touched before
// timing: where the op's time goes without TensorFlow's dispatch and allocation.
//
//   bash tools/cpu_core_bench.sh            # builds with the library's flags and runs
//
// For each shape it prints the forward and gradient time (best of N) per element and per thread,
// with 1 and 2 threads, and beside them a plain two-stream read (sum of y_true + y_pred) at the same
// size: the memory-bound floor. "in cache" rows use inputs small enough to stay in L2/L3, so they
// show the compute cost alone.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cc/kernels/kld_cpu.h"

namespace {

using tf_kld::cpu::Kernels;
using tf_kld::cpu::Type;

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs work(thread, begin_row, end_row) on `threads` threads; best wall time of `reps`.
template <typename F>
double Best(int reps, int threads, int64_t rows, F work) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double start = Now();
    if (threads == 1) {
      work(0, 0, rows);
    } else {
      std::vector<std::thread> pool;
      for (int w = 0; w < threads; ++w) {
        pool.emplace_back(work, w, rows * w / threads, rows * (w + 1) / threads);
      }
      for (auto& t : pool) t.join();
    }
    best = std::min(best, Now() - start);
  }
  return best;
}

struct Case {
  int64_t rows, cols;
  Type type;
  const char* note;
};

void Run(const Kernels& k, const Case& c, int threads, int reps) {
  const int64_t n = c.rows * c.cols;
  const size_t size = c.type == Type::kFloat ? 4 : 2;
  std::vector<unsigned char> t(n * size), p(n * size), out(n * size), loss(c.rows * size),
      grad(c.rows * size);
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uniform(1e-3f, 1.0f);
  auto fill = [&](std::vector<unsigned char>& v, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      const float x = uniform(gen);
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      if (size == 4) {
        std::memcpy(&v[i * 4], &x, 4);
      } else {  // bfloat16 by truncation: any value in (0, 1] will do for timing
        const uint16_t h = static_cast<uint16_t>(bits >> 16);
        std::memcpy(&v[i * 2], &h, 2);
      }
    }
  };
  fill(t, n), fill(p, n), fill(grad, c.rows);
  std::memset(out.data(), 0, out.size());
  const double eps = 1e-7;
  const double fwd = Best(reps, threads, c.rows, [&](int, int64_t b, int64_t e) {
    k.forward_rows(c.type, t.data(), p.data(), loss.data(), b, e, c.cols, eps);
  });
  const double bwd = Best(reps, threads, c.rows, [&](int, int64_t b, int64_t e) {
    k.gradient(c.type, grad.data(), t.data(), p.data(), out.data(), b * c.cols, e * c.cols, c.cols,
               eps, false);
  });
  std::vector<double> sums(threads);
  const double read = Best(reps, threads, c.rows, [&](int w, int64_t b, int64_t e) {
    // The memory-bound floor: read both inputs once (as 64-bit words, summed so nothing is elided).
    const int64_t begin = b * c.cols * size / 8, end = e * c.cols * size / 8;
    const auto* a = reinterpret_cast<const uint64_t*>(t.data());
    const auto* z = reinterpret_cast<const uint64_t*>(p.data());
    uint64_t s0 = 0, s1 = 0;
    for (int64_t i = begin; i < end; ++i) s0 += a[i], s1 += z[i];
    sums[w] = static_cast<double>(s0 ^ s1);
  });
  const double bytes_in = 2.0 * n * size;
  std::printf("%-8s %9lldx%-7lld %-9s %d thr | fwd %7.3f ms %5.2f ns/elem/thr %5.1f GB/s | "
              "grad %7.3f ms %5.1f GB/s | read %7.3f ms %5.1f GB/s | fwd/read %4.2f\n",
              c.type == Type::kFloat ? "float32" : "bfloat16", static_cast<long long>(c.rows),
              static_cast<long long>(c.cols), c.note, threads, fwd * 1e3, fwd * 1e9 * threads / n,
              bytes_in / fwd / 1e9, bwd * 1e3, (bytes_in * 1.5) / bwd / 1e9, read * 1e3,
              bytes_in / read / 1e9, fwd / read);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const Kernels& k = tf_kld::cpu::Cpu();
  std::printf("kernel core: %s\n", k.isa);
  const Case cases[] = {
      {256, 4096, Type::kFloat, "in cache"},   {16384, 16, Type::kFloat, "in cache"},
      {256, 4096, Type::kBfloat16, "in cache"}, {4096, 4096, Type::kFloat, "memory"},
      {1000000, 16, Type::kFloat, "memory"},    {32, 131072, Type::kFloat, "memory"},
      {4096, 4096, Type::kBfloat16, "memory"},
  };
  for (const Case& c : cases) {
    if (quick && c.rows * c.cols > (1 << 20)) continue;
    const int reps = c.rows * c.cols > (1 << 22) ? 15 : 200;
    for (int threads : {1, 2}) Run(k, c, threads, reps);
  }
  return 0;
}
