// Standalone test of the CPU kernel core (kld_cpu.h), no TensorFlow: tools/sanitize.sh builds it with
// AddressSanitizer and UndefinedBehaviorSanitizer and runs it.
//
// For each ISA table the CPU can run (generic; AVX2 when present), each type (half, bfloat16 as
// uint16 storage, float, double) and each clip epsilon, it runs forward_rows, sum_terms and gradient
// over edge shapes (rows 0/1/many; cols around the 4- and 8-lane widths, and one row of 131073),
// on buffers that end exactly at the allocation's end, with and without a one-element offset, on
// random values mixed with special ones (NaN, +-Inf, +-0, negatives, > 1, subnormals, 3e38, values
// at and next to eps and 1). Results are checked against a double-precision scalar reference;
// sub-ranges (row ranges, gradient ranges that cut rows) must write exactly their range; in-place
// gradients must equal out-of-place ones bit for bit. Exit status 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cc/kernels/kld_cpu.h"

namespace {

using tf_kld::cpu::Kernels;
using tf_kld::cpu::Type;

long g_checks = 0;
long g_failures = 0;

// ---------------------------------------------------------------------------------------------
// Element types, with 16-bit conversions written independently of the kernel's.

const char* Name(Type type) {
  switch (type) {
    case Type::kHalf: return "half";
    case Type::kBfloat16: return "bfloat16";
    case Type::kFloat: return "float";
    case Type::kDouble: return "double";
  }
  return "?";
}

size_t Size(Type type) { return type == Type::kDouble ? 8 : type == Type::kFloat ? 4 : 2; }

bool ComputesInFloat(Type type) { return type != Type::kDouble; }

double RoundToQuantum(double d, int mantissa_bits, int min_exponent) {
  // Round-to-nearest-even of d to a binary format with the given significand width and smallest
  // normal exponent (subnormals below it); overflow is left to the caller.
  if (d == 0 || !std::isfinite(d)) return d;
  int e;
  std::frexp(d, &e);  // d = m * 2^e, m in [0.5, 1)
  const int quantum_exp = std::max(e, min_exponent + 1) - mantissa_bits;
  return std::ldexp(std::nearbyint(std::ldexp(d, -quantum_exp)), quantum_exp);
}

uint16_t DoubleToBf16(double d) {
  if (std::isnan(d)) return 0x7fc0;
  double r = RoundToQuantum(d, 8, -126);
  if (std::fabs(r) > std::numeric_limits<float>::max()) r = std::copysign(INFINITY, d);
  const float f = static_cast<float>(r);  // exact
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

double Bf16ToDouble(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t DoubleToHalf(double d) {
  const _Float16 h = static_cast<_Float16>(d);  // correctly rounded by the compiler's runtime
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

double HalfToDouble(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<double>(h);
}

// A typed buffer of n elements that ends exactly where its allocation ends (so any read or write
// past the end is caught by ASan), optionally starting one element into the allocation.
class Buffer {
 public:
  Buffer(Type type, int64_t n, bool offset)
      : type_(type), n_(n), offset_(offset ? 1 : 0),
        storage_(new unsigned char[(n + offset_) * Size(type)]) {}
  ~Buffer() { delete[] storage_; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() { return storage_ + offset_ * Size(type_); }
  const void* data() const { return storage_ + offset_ * Size(type_); }
  int64_t size() const { return n_; }

  double Get(int64_t i) const {
    const unsigned char* p = static_cast<const unsigned char*>(data()) + i * Size(type_);
    switch (type_) {
      case Type::kHalf: { uint16_t v; std::memcpy(&v, p, 2); return HalfToDouble(v); }
      case Type::kBfloat16: { uint16_t v; std::memcpy(&v, p, 2); return Bf16ToDouble(v); }
      case Type::kFloat: { float v; std::memcpy(&v, p, 4); return v; }
      case Type::kDouble: { double v; std::memcpy(&v, p, 8); return v; }
    }
    return 0;
  }
  void Set(int64_t i, double value) {
    unsigned char* p = static_cast<unsigned char*>(data()) + i * Size(type_);
    switch (type_) {
      case Type::kHalf: { const uint16_t v = DoubleToHalf(value); std::memcpy(p, &v, 2); return; }
      case Type::kBfloat16: { const uint16_t v = DoubleToBf16(value); std::memcpy(p, &v, 2); return; }
      case Type::kFloat: { const float v = static_cast<float>(value); std::memcpy(p, &v, 4); return; }
      case Type::kDouble: std::memcpy(p, &value, 8); return;
    }
  }
  void Fill(unsigned char byte) { std::memset(data(), byte, n_ * Size(type_)); }
  bool Untouched(int64_t i, unsigned char byte) const {
    const unsigned char* p = static_cast<const unsigned char*>(data()) + i * Size(type_);
    for (size_t b = 0; b < Size(type_); ++b) {
      if (p[b] != byte) return false;
    }
    return true;
  }
  void CopyFrom(const Buffer& other) { std::memcpy(data(), other.data(), n_ * Size(type_)); }
  bool SameBits(const Buffer& other) const {
    return std::memcmp(data(), other.data(), n_ * Size(type_)) == 0;
  }

 private:
  Type type_;
  int64_t n_;
  int64_t offset_;
  unsigned char* storage_;
};

double Rounded(Type type, double value) {
  Buffer b(type, 1, false);
  b.Set(0, value);
  return b.Get(0);
}

// Distance from |x| (rounded to type) to the next larger value of the type.
double Spacing(Type type, double x) {
  x = std::fabs(Rounded(type, x));
  if (!std::isfinite(x)) return 0;
  switch (type) {
    case Type::kHalf: return HalfToDouble(DoubleToHalf(x) + 1) - x;
    case Type::kBfloat16: return Bf16ToDouble(DoubleToBf16(x) + 1) - x;
    case Type::kFloat: return std::nextafter(static_cast<float>(x), INFINITY) - x;
    case Type::kDouble: return std::nextafter(x, INFINITY) - x;
  }
  return 0;
}

// The next value of the type above (up=true) or below a positive finite value of the type.
double Neighbour(Type type, double x, bool up) {
  switch (type) {
    case Type::kHalf: return HalfToDouble(DoubleToHalf(x) + (up ? 1 : -1));
    case Type::kBfloat16: return Bf16ToDouble(DoubleToBf16(x) + (up ? 1 : -1));
    case Type::kFloat: return std::nextafter(static_cast<float>(x), up ? INFINITY : 0.0f);
    case Type::kDouble: return std::nextafter(x, up ? INFINITY : 0.0);
  }
  return x;
}

double SmallestSubnormal(Type type) {
  switch (type) {
    case Type::kHalf: return std::ldexp(1.0, -24);
    case Type::kBfloat16: return std::ldexp(1.0, -133);
    case Type::kFloat: return std::numeric_limits<float>::denorm_min();
    case Type::kDouble: return std::numeric_limits<double>::denorm_min();
  }
  return 0;
}

std::vector<double> SpecialValues(Type type, double eps) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double tiny = SmallestSubnormal(type);
  std::vector<double> v = {0.0, -0.0, -0.5, -1.0, -eps, eps, Neighbour(type, eps, true),
                           Neighbour(type, eps, false), eps / 4, 1.0, Neighbour(type, 1.0, true),
                           Neighbour(type, 1.0, false), 1.5, 2.0, 1e4, 3e38, -3e38, INFINITY,
                           -INFINITY, nan, tiny, -tiny, 3 * tiny, 0.5, 1e-3};
  for (double& x : v) x = Rounded(type, x);
  return v;
}

// ---------------------------------------------------------------------------------------------
// The double-precision reference.

double Clip(double x, double eps) {
  const double upper = x > 1.0 ? 1.0 : x;
  return upper < eps ? eps : upper;
}

bool Inside(double x, double eps) { return x >= eps && x <= 1.0; }

// tc / pc as the kernel forms it: in float for the float-computing types, where it overflows to
// inf once pc is below tc / FLT_MAX (only with a subnormal epsilon).
double Ratio(Type type, double tc, double pc) {
  return ComputesInFloat(type) ? static_cast<double>(static_cast<float>(tc / pc)) : tc / pc;
}

struct Expected {
  double value;
  double tol;
};

// Absolute error allowance of one rounded product or quotient that underflows, in the type the
// kernel computes in.
double Underflow(Type type) {
  return ComputesInFloat(type) ? 2 * static_cast<double>(std::numeric_limits<float>::denorm_min())
                               : 2 * std::numeric_limits<double>::denorm_min();
}

double Rtol(Type type) { return ComputesInFloat(type) ? 1e-6 : 1e-13; }

Expected RowLoss(Type type, const Buffer& t, const Buffer& p, int64_t begin, int64_t n, double eps) {
  double sum = 0, magnitude = 0;
  for (int64_t i = begin; i < begin + n; ++i) {
    const double tc = Clip(t.Get(i), eps), pc = Clip(p.Get(i), eps);
    const double log_ratio = std::log(Ratio(type, tc, pc));
    sum += tc * log_ratio;
    magnitude += tc * (1.0 + std::fabs(log_ratio));
  }
  const double value = sum;
  double tol = Rtol(type) * (std::fabs(value) + magnitude) + n * Underflow(type);
  return {value, tol};
}

Expected GradientAt(Type type, double g, double t, double p, double eps, bool wrt_true) {
  const double tc = Clip(t, eps), pc = Clip(p, eps);
  if (wrt_true) {
    if (!Inside(t, eps)) return {0.0, 0.0};
    const double log_ratio = std::log(Ratio(type, tc, pc));
    const double value = g * (log_ratio + 1.0);
    return {value, Rtol(type) * (std::fabs(value) + std::fabs(g) * (1.0 + std::fabs(log_ratio))) +
                       Underflow(type)};
  }
  if (!Inside(p, eps)) return {0.0, 0.0};
  const double value = -(g * tc) / p;
  return {value, Rtol(type) * std::fabs(value) + Underflow(type) / p};
}

// got (already read back from the type) against the expectation rounded to the type.
bool Close(Type type, double got, Expected want) {
  const double w = Rounded(type, want.value);
  if (std::isnan(w) || std::isnan(got)) return std::isnan(w) && std::isnan(got);
  if (std::isinf(w) || std::isinf(got)) return w == got;
  double tol = want.tol;
  if (type == Type::kHalf || type == Type::kBfloat16) tol += Spacing(type, want.value);
  return std::fabs(got - w) <= tol;
}

void Check(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  if (++g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

std::string Describe(const char* isa, Type type, int64_t rows, int64_t cols, bool offset, double eps) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "[%s %s rows=%lld cols=%lld offset=%d eps=%g]", isa, Name(type),
                static_cast<long long>(rows), static_cast<long long>(cols), offset ? 1 : 0, eps);
  return buf;
}

std::string Value(const char* label, double got, Expected want) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), " %s: got %.17g want %.17g tol %.3g", label, got, want.value,
                want.tol);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// The cases.

struct Inputs {
  Buffer t, p, g;  // g: one upstream gradient value per row
  Inputs(Type type, int64_t rows, int64_t cols, bool offset)
      : t(type, rows * cols, offset), p(type, rows * cols, offset), g(type, rows, offset) {}
};

void FillRandom(std::mt19937_64& rng, Type type, double eps, Inputs* in) {
  const std::vector<double> specials = SpecialValues(type, eps);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::uniform_int_distribution<size_t> pick(0, specials.size() - 1);
  auto draw = [&](double special_fraction) {
    const double u = unit(rng);
    if (u < special_fraction) return specials[pick(rng)];
    if (u < special_fraction + 0.05) return 3.0 * unit(rng) - 1.0;  // outside [eps, 1] too
    return unit(rng);
  };
  for (int64_t i = 0; i < in->t.size(); ++i) in->t.Set(i, draw(0.25));
  for (int64_t i = 0; i < in->p.size(); ++i) in->p.Set(i, draw(0.25));
  for (int64_t i = 0; i < in->g.size(); ++i) in->g.Set(i, draw(0.1) * 4.0 - 2.0);
}

void TestForward(const Kernels& k, Type type, const Inputs& in, int64_t rows, int64_t cols, bool offset,
                 double eps, const std::string& where) {
  constexpr unsigned char kSentinel = 0xA5;
  Buffer loss(type, rows, offset);
  loss.Fill(kSentinel);
  k.forward_rows(type, in.t.data(), in.p.data(), loss.data(), 0, rows, cols, eps);
  for (int64_t r = 0; r < rows; ++r) {
    const Expected want = RowLoss(type, in.t, in.p, r * cols, cols, eps);
    const double got = loss.Get(r);
    if (!Close(type, got, want)) {
      Check(false, where + " forward row " + std::to_string(r) + Value("loss", got, want));
    } else {
      Check(true, "");
    }
  }
  // A row range writes exactly its rows.
  if (rows >= 3) {
    Buffer part(type, rows, offset);
    part.Fill(kSentinel);
    k.forward_rows(type, in.t.data(), in.p.data(), part.data(), 1, rows - 1, cols, eps);
    bool ok = part.Untouched(0, kSentinel) && part.Untouched(rows - 1, kSentinel);
    for (int64_t r = 1; r < rows - 1; ++r) {
      ok = ok && (part.Get(r) == loss.Get(r) || (std::isnan(part.Get(r)) && std::isnan(loss.Get(r))));
    }
    Check(ok, where + " forward_rows [1, rows-1) must write exactly those rows, as the full call");
  }
  // sum_terms over chunks of a row (as the op splits very wide rows) and over nothing.
  if (rows > 0 && cols > 0) {
    const int64_t row = rows - 1;
    const unsigned char* t = static_cast<const unsigned char*>(in.t.data()) + row * cols * Size(type);
    const unsigned char* p = static_cast<const unsigned char*>(in.p.data()) + row * cols * Size(type);
    for (int64_t chunk : {cols, int64_t{7}, int64_t{4096}}) {
      double sum = 0;
      for (int64_t start = 0; start < cols; start += chunk) {
        const int64_t n = std::min(chunk, cols - start);
        sum += k.sum_terms(type, t + start * Size(type), p + start * Size(type), n, eps);
      }
      Expected want = RowLoss(type, in.t, in.p, row * cols, cols, eps);
      want.tol += std::fabs(want.value) * 1e-15 * (cols / chunk + 1);
      const bool ok = std::isnan(want.value) ? std::isnan(sum)
                      : std::isinf(want.value) ? sum == want.value
                                               : std::fabs(sum - want.value) <= want.tol;
      Check(ok, where + " sum_terms in chunks of " + std::to_string(chunk) + Value("sum", sum, want));
    }
    Check(k.sum_terms(type, t, p, 0, eps) == 0.0, where + " sum_terms of 0 elements must be 0");
  }
}

void TestGradient(const Kernels& k, Type type, const Inputs& in, int64_t rows, int64_t cols,
                  bool offset, double eps, std::mt19937_64& rng, const std::string& where) {
  const int64_t n = rows * cols;
  if (n == 0) return;  // the op never calls the gradient on an empty tensor
  constexpr unsigned char kSentinel = 0x5A;
  for (bool wrt_true : {false, true}) {
    const std::string w = where + (wrt_true ? " d/dy_true" : " d/dy_pred");
    // Full range in one call.
    Buffer full(type, n, offset);
    full.Fill(kSentinel);
    k.gradient(type, in.g.data(), in.t.data(), in.p.data(), full.data(), 0, n, cols, eps, wrt_true);
    long bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const Expected want = GradientAt(type, in.g.Get(i / cols), in.t.Get(i), in.p.Get(i), eps, wrt_true);
      const double got = full.Get(i);
      if (!Close(type, got, want) && bad++ < 3) {
        Check(false, w + " element " + std::to_string(i) + " (t=" + std::to_string(in.t.Get(i)) +
                         " p=" + std::to_string(in.p.Get(i)) + ")" + Value("grad", got, want));
      }
    }
    Check(bad == 0, w + " full range");
    // Blocks of 64 elements (what the op's sharding uses), then random cuts through rows: each
    // call writes exactly [begin, end), and the pieces equal the full call bit for bit.
    for (int mode = 0; mode < 2; ++mode) {
      Buffer pieces(type, n, offset);
      pieces.Fill(kSentinel);
      std::vector<int64_t> cuts = {0};
      if (mode == 0) {
        for (int64_t c = 64; c < n; c += 64) cuts.push_back(c);
      } else {
        std::uniform_int_distribution<int64_t> at(1, n - 1 > 0 ? n - 1 : 1);
        for (int i = 0; i < 6 && n > 1; ++i) cuts.push_back(at(rng));
        for (int64_t r = 1; r < rows && r < 4; ++r) cuts.push_back(r * cols + (cols > 2 ? 1 : 0));
        std::sort(cuts.begin(), cuts.end());
        cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
        cuts.erase(std::remove(cuts.begin() + 1, cuts.end(), int64_t{0}), cuts.end());
      }
      cuts.push_back(n);
      bool exact = true;
      for (size_t c = 0; c + 1 < cuts.size(); ++c) {
        const int64_t begin = cuts[c], end = cuts[c + 1];
        if (begin >= end) continue;
        k.gradient(type, in.g.data(), in.t.data(), in.p.data(), pieces.data(), begin, end, cols, eps,
                   wrt_true);
        // Nothing past `end` written yet.
        for (int64_t i = end; i < std::min(n, end + 16); ++i) exact = exact && pieces.Untouched(i, kSentinel);
      }
      Check(exact, w + (mode == 0 ? " 64-element blocks" : " random ranges") + " wrote past their end");
      // Elements computed on the vector path in one split and the scalar tail in another may
      // differ in the last bit of float32 math; both must still meet the reference.
      long wrong = 0;
      for (int64_t i = 0; i < n; ++i) {
        const Expected want = GradientAt(type, in.g.Get(i / cols), in.t.Get(i), in.p.Get(i), eps, wrt_true);
        if (!Close(type, pieces.Get(i), want)) ++wrong;
      }
      Check(wrong == 0, w + (mode == 0 ? " 64-element blocks" : " random ranges") + ": " +
                            std::to_string(wrong) + " elements differ from the reference");
    }
    // In place: out aliases the input it is the gradient of, as the op may arrange.
    Buffer t_copy(type, n, offset), p_copy(type, n, offset);
    t_copy.CopyFrom(in.t);
    p_copy.CopyFrom(in.p);
    Buffer& alias = wrt_true ? t_copy : p_copy;
    k.gradient(type, in.g.data(), t_copy.data(), p_copy.data(), alias.data(), 0, n, cols, eps, wrt_true);
    Check(alias.SameBits(full), w + " in place must equal out of place bit for bit");
  }
}

void TestSpecialPairs(const Kernels& k, Type type, double eps, bool offset, std::mt19937_64& rng) {
  // Every (t, p) pair of special values, one row per t: every value meets every other in the
  // vector body and in the scalar tail.
  const std::vector<double> s = SpecialValues(type, eps);
  const int64_t rows = static_cast<int64_t>(s.size()), cols = rows;
  Inputs in(type, rows, cols, offset);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      in.t.Set(r * cols + c, s[r]);
      in.p.Set(r * cols + c, s[c]);
    }
    in.g.Set(r, r % 2 ? 1.5 : -0.75);
  }
  const std::string where = Describe(k.isa, type, rows, cols, offset, eps) + " special pairs";
  TestForward(k, type, in, rows, cols, offset, eps, where);
  TestGradient(k, type, in, rows, cols, offset, eps, rng, where);
}

void TestTable(const Kernels& k) {
  std::mt19937_64 rng(20240607);
  const Type types[] = {Type::kHalf, Type::kBfloat16, Type::kFloat, Type::kDouble};
  const int64_t col_counts[] = {0, 1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 64};
  const int64_t row_counts[] = {0, 1, 5, 9};
  for (Type type : types) {
    // Keras' default epsilon rounded to the type, a larger one, and (float/double) a subnormal one,
    // which sends every vector through the scalar log fallback.
    std::vector<double> epsilons = {Rounded(type, 1e-7), Rounded(type, 1e-3)};
    if (type == Type::kFloat) epsilons.push_back(Rounded(type, 1e-39));
    if (type == Type::kDouble) epsilons.push_back(1e-310);
    for (double eps : epsilons) {
      for (bool offset : {false, true}) {
        for (int64_t rows : row_counts) {
          for (int64_t cols : col_counts) {
            Inputs in(type, rows, cols, offset);
            FillRandom(rng, type, eps, &in);
            const std::string where = Describe(k.isa, type, rows, cols, offset, eps);
            TestForward(k, type, in, rows, cols, offset, eps, where);
            TestGradient(k, type, in, rows, cols, offset, eps, rng, where);
          }
        }
        // One very wide row (odd, past every chunk size), and two rows of it: unaligned, once per type.
        for (int64_t rows : {int64_t{1}, int64_t{2}}) {
          if (!offset || eps != epsilons[0]) break;
          const int64_t cols = 131073;
          Inputs in(type, rows, cols, offset);
          FillRandom(rng, type, eps, &in);
          const std::string where = Describe(k.isa, type, rows, cols, offset, eps);
          TestForward(k, type, in, rows, cols, offset, eps, where);
          TestGradient(k, type, in, rows, cols, offset, eps, rng, where);
        }
        TestSpecialPairs(k, type, eps, offset, rng);
      }
    }
  }
}

bool CpuHasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool CpuHasAvx512() {
#if defined(__x86_64__) || defined(__i386__)
  return CpuHasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace

int main() {
  std::vector<const Kernels*> tables = {&tf_kld::cpu::GenericKernels()};
  if (CpuHasAvx2()) tables.push_back(&tf_kld::cpu::Avx2Kernels());
  if (CpuHasAvx512()) tables.push_back(&tf_kld::cpu::Avx512Kernels());
  std::string isas;
  for (const Kernels* k : tables) {
    TestTable(*k);
    isas += std::string(isas.empty() ? "" : ", ") + k->isa;
  }
  // Cpu() picks the widest build the CPU has, capped by TF_KLD_CPU_ISA=generic|avx2.
  const char* cap = std::getenv("TF_KLD_CPU_ISA");
  const std::string capped = cap == nullptr ? "" : cap;
  const char* want = capped == "generic"                     ? "generic"
                     : CpuHasAvx512() && capped != "avx2"    ? "avx512"
                     : CpuHasAvx2()                          ? "avx2"
                                                             : "generic";
  Check(std::string(tf_kld::cpu::Cpu().isa) == want, "Cpu() chose the wrong table");
  std::printf("kld_cpu_test: %ld checks, %ld failures; tables: %s\n", g_checks, g_failures, isas.c_str());
  return g_failures == 0 ? 0 : 1;
}
