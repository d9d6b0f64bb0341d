// The CPU kernel core, compiled once per ISA (see kld_cpu.h). Include it from exactly one .cc per
// ISA after defining TF_KLD_ISA_NAME ("generic", "avx2") and TF_KLD_KERNELS_FN (the table getter).
//
// Everything here has internal linkage (an anonymous namespace), so the AVX2 build of a helper can
// never be linked in place of the baseline one. SIMD is written with GCC vector extensions over
// 8 float lanes; the compiler maps them to one AVX register or two SSE registers.
//
// float32 log: the rational approximation TensorFlow's CPU Log kernel uses (see Log below); a vector
// that holds anything but positive normal numbers (0, Inf, NaN, negatives, subnormals: possible only
// with an unusual epsilon) falls back to std::log lane by lane, as do the last n < 8 elements of a
// row. float64 uses std::log throughout, as TensorFlow does.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "cc/kernels/kld_cpu.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors never cross a call boundary here.

namespace tf_kld {
namespace cpu {
namespace {

constexpr int kLanes = 8;
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef uint16_t H8 __attribute__((vector_size(16)));
typedef float F4 __attribute__((vector_size(16)));
typedef double D4 __attribute__((vector_size(32)));

#define TF_KLD_INLINE inline __attribute__((always_inline))

template <typename To, typename From>
TF_KLD_INLINE To BitCast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

TF_KLD_INLINE F8 Splat(float x) { return F8{x, x, x, x, x, x, x, x}; }

TF_KLD_INLINE bool AnyLane(I8 mask) {
#if defined(__AVX2__)
  return !_mm256_testz_si256(BitCast<__m256i>(mask), BitCast<__m256i>(mask));
#else
  const __m128i* halves = reinterpret_cast<const __m128i*>(&mask);
  return _mm_movemask_epi8(_mm_or_si128(_mm_loadu_si128(halves), _mm_loadu_si128(halves + 1))) != 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// Scalar 16-bit conversions (round to nearest even; NaN stays NaN), as Eigen::half / bfloat16.

TF_KLD_INLINE float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float value = static_cast<float>(man) * 5.9604644775390625e-8f;  // man * 2^-24
    bits = sign | BitCast<uint32_t>(value);
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return BitCast<float>(bits);
}

TF_KLD_INLINE uint16_t FloatToHalf(float f) {
  uint32_t x = BitCast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to Inf
  if (x < 0x38800000u) {                         // below 2^-14: subnormal half (or zero)
    const float scaled = BitCast<float>(x) * 16777216.0f;  // exact: * 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias exponent 127 -> 15, round to nearest even
  return sign | static_cast<uint16_t>(x >> 13);
}

TF_KLD_INLINE float Bfloat16ToFloat(uint16_t b) { return BitCast<float>(static_cast<uint32_t>(b) << 16); }

TF_KLD_INLINE uint16_t FloatToBfloat16(float f) {
  const uint32_t x = BitCast<uint32_t>(f);
  if (f != f) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Element types: storage, scalar conversion, and 8-lane load/store in float.

struct HalfT {
  typedef uint16_t Storage;
  static float ToFloat(Storage v) { return HalfToFloat(v); }
  static Storage FromFloat(float v) { return FloatToHalf(v); }
  static TF_KLD_INLINE F8 Load(const Storage* p) {
#if defined(__F16C__)
    return BitCast<F8>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    F8 v;
    for (int i = 0; i < kLanes; ++i) v[i] = HalfToFloat(p[i]);
    return v;
#endif
  }
  static TF_KLD_INLINE void Store(Storage* p, F8 v) {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(BitCast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int i = 0; i < kLanes; ++i) p[i] = FloatToHalf(v[i]);
#endif
  }
};

struct Bfloat16T {
  typedef uint16_t Storage;
  static float ToFloat(Storage v) { return Bfloat16ToFloat(v); }
  static Storage FromFloat(float v) { return FloatToBfloat16(v); }
  static TF_KLD_INLINE F8 Load(const Storage* p) {
    H8 h;
    std::memcpy(&h, p, sizeof(h));
    return BitCast<F8>(__builtin_convertvector(h, U8) << 16);
  }
  static TF_KLD_INLINE void Store(Storage* p, F8 v) {
    const U8 x = BitCast<U8>(v);
    const U8 rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const U8 quiet_nan = (x >> 16) | 0x40u;
    const U8 r = (v != v) ? quiet_nan : rounded;
    const H8 h = __builtin_convertvector(r, H8);
    std::memcpy(p, &h, sizeof(h));
  }
};

struct FloatT {
  typedef float Storage;
  static float ToFloat(Storage v) { return v; }
  static Storage FromFloat(float v) { return v; }
  static TF_KLD_INLINE F8 Load(const Storage* p) {
    F8 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static TF_KLD_INLINE void Store(Storage* p, F8 v) { std::memcpy(p, &v, sizeof(v)); }
};

// ---------------------------------------------------------------------------------------------
// float32 math, 8 lanes.

TF_KLD_INLINE F8 LogSlow(F8 x) {
  F8 r = x;
  for (int i = 0; i < kLanes; ++i) r[i] = std::log(x[i]);
  return r;
}

// Natural log of 8 floats: log(m * 2^e) = e * ln2 + log1p(f), f = m - 1 in [sqrt(1/2)-1, sqrt(2)-1),
// log1p(f) ~ f * P(f) / Q(f): the rational minimax form (and coefficients) Eigen's plog uses for
// TensorFlow's own Log kernel, evaluated in the same order without FMA, so the two agree.
TF_KLD_INLINE F8 Log(F8 x) {
  const U8 bits = BitCast<U8>(x);
  // Positive normal finite <=> biased exponent in [1, 254] and sign clear.
  const I8 special = (bits - 0x00800000u) >= 0x7f000000u;
  if (__builtin_expect(AnyLane(special), 0)) return LogSlow(x);
  const F8 m = BitCast<F8>((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const I8 below = m < Splat(0.707106781186547524f);             // -1 where true
  const F8 e = __builtin_convertvector(BitCast<I8>(bits >> 23) - 126 + below, F8);
  const F8 f = (m - Splat(1.0f)) + BitCast<F8>(BitCast<I8>(m) & below);
  const F8 p = f * ((Splat(0.18256296349849254f) * f + Splat(1.0000000190281063f)) * f +
                    Splat(1.0000000190281136f));
  const F8 q = ((Splat(0.049616247954120038f) * f + Splat(0.59923249590823520f)) * f +
                Splat(1.4999999999999927f)) * f + Splat(1.0f);
  return e * Splat(0.693147182f) + p / q;
}

// max(min(x, 1), eps); NaN passes through (both comparisons are false), as tf.clip_by_value.
TF_KLD_INLINE F8 Clip(F8 x, F8 eps) {
  const F8 upper = x > Splat(1.0f) ? Splat(1.0f) : x;
  return upper < eps ? eps : upper;
}

// Where the clip passes the gradient: eps <= x <= 1 (false at NaN).
TF_KLD_INLINE I8 Inside(F8 x, F8 eps) { return (x >= eps) & (x <= Splat(1.0f)); }

TF_KLD_INLINE F8 Terms(F8 t, F8 p, F8 eps) {
  const F8 tc = Clip(t, eps);
  return tc * Log(tc / Clip(p, eps));
}

TF_KLD_INLINE void Accumulate(F8 terms, D4* acc0, D4* acc1) {
  *acc0 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 0, 1, 2, 3), D4);
  *acc1 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 4, 5, 6, 7), D4);
}

// Scalar float versions for a row's last n < 8 elements. They use std::log, as TensorFlow's own
// kernels do for elements that do not fill a SIMD packet, so short rows match it exactly.
TF_KLD_INLINE float ClipF(float x, float eps) {
  const float upper = x > 1.0f ? 1.0f : x;
  return upper < eps ? eps : upper;
}

TF_KLD_INLINE float TermF(float t, float p, float eps) {
  const float tc = ClipF(t, eps);
  return tc * std::log(tc / ClipF(p, eps));
}

TF_KLD_INLINE float GradScalarF(float g, float t, float p, float eps, bool wrt_true) {
  const float tc = ClipF(t, eps);
  if (wrt_true) return t >= eps && t <= 1.0f ? g * (std::log(tc / ClipF(p, eps)) + 1.0f) : 0.0f;
  return p >= eps && p <= 1.0f ? -(g * tc) / p : 0.0f;
}

template <typename E>
double SumTermsF(const typename E::Storage* t, const typename E::Storage* p, int64_t n, float eps) {
  const F8 e = Splat(eps);
  D4 acc0 = {0, 0, 0, 0}, acc1 = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) Accumulate(Terms(E::Load(t + i), E::Load(p + i), e), &acc0, &acc1);
  const D4 acc = acc0 + acc1;
  double sum = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  for (; i < n; ++i) sum += TermF(E::ToFloat(t[i]), E::ToFloat(p[i]), eps);
  return sum;
}

template <typename E>
void ForwardRowsF(const void* y_true, const void* y_pred, void* out, int64_t row_begin,
                  int64_t row_end, int64_t cols, float eps) {
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  auto* loss = static_cast<typename E::Storage*>(out);
  for (int64_t r = row_begin; r < row_end; ++r) {
    loss[r] = E::FromFloat(static_cast<float>(SumTermsF<E>(t + r * cols, p + r * cols, cols, eps)));
  }
}

template <typename E>
TF_KLD_INLINE F8 GradF(F8 g, F8 t, F8 p, F8 eps, bool wrt_true) {
  const F8 tc = Clip(t, eps);
  const F8 zero = Splat(0.0f);
  if (wrt_true) return Inside(t, eps) ? g * (Log(tc / Clip(p, eps)) + Splat(1.0f)) : zero;
  return Inside(p, eps) ? -(g * tc) / p : zero;
}

template <typename E>
void GradientF(const void* grad, const void* y_true, const void* y_pred, void* out, int64_t begin,
               int64_t end, int64_t cols, float eps, bool wrt_true) {
  const auto* g = static_cast<const typename E::Storage*>(grad);
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  auto* o = static_cast<typename E::Storage*>(out);
  const F8 e = Splat(eps);
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const F8 gv = Splat(E::ToFloat(g[row]));
    for (; i + kLanes <= stop; i += kLanes) {
      E::Store(o + i, GradF<E>(gv, E::Load(t + i), E::Load(p + i), e, wrt_true));
    }
    const float gs = E::ToFloat(g[row]);
    for (; i < stop; ++i) {
      o[i] = E::FromFloat(GradScalarF(gs, E::ToFloat(t[i]), E::ToFloat(p[i]), eps, wrt_true));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// float64: scalar, std::log.

TF_KLD_INLINE double ClipD(double x, double eps) {
  const double upper = x > 1.0 ? 1.0 : x;
  return upper < eps ? eps : upper;
}

TF_KLD_INLINE bool InsideD(double x, double eps) { return x >= eps && x <= 1.0; }

double SumTermsD(const double* t, const double* p, int64_t n, double eps) {
  double acc0 = 0, acc1 = 0;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const double t0 = ClipD(t[i], eps), t1 = ClipD(t[i + 1], eps);
    acc0 += t0 * std::log(t0 / ClipD(p[i], eps));
    acc1 += t1 * std::log(t1 / ClipD(p[i + 1], eps));
  }
  if (i < n) {
    const double t0 = ClipD(t[i], eps);
    acc0 += t0 * std::log(t0 / ClipD(p[i], eps));
  }
  return acc0 + acc1;
}

void ForwardRowsD(const void* y_true, const void* y_pred, void* out, int64_t row_begin,
                  int64_t row_end, int64_t cols, double eps) {
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  auto* loss = static_cast<double*>(out);
  for (int64_t r = row_begin; r < row_end; ++r) loss[r] = SumTermsD(t + r * cols, p + r * cols, cols, eps);
}

void GradientD(const void* grad, const void* y_true, const void* y_pred, void* out, int64_t begin,
               int64_t end, int64_t cols, double eps, bool wrt_true) {
  const auto* g = static_cast<const double*>(grad);
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  auto* o = static_cast<double*>(out);
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const double gv = g[row];
    if (wrt_true) {
      for (; i < stop; ++i) {
        const double tc = ClipD(t[i], eps);
        o[i] = InsideD(t[i], eps) ? gv * (std::log(tc / ClipD(p[i], eps)) + 1.0) : 0.0;
      }
    } else {
      for (; i < stop; ++i) {
        const double pi = p[i];
        o[i] = InsideD(pi, eps) ? -(gv * ClipD(t[i], eps)) / pi : 0.0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The exported table.

void ForwardRows(Type type, const void* t, const void* p, void* out, int64_t row_begin,
                 int64_t row_end, int64_t cols, double eps) {
  const float epsf = static_cast<float>(eps);
  switch (type) {
    case Type::kHalf: return ForwardRowsF<HalfT>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kBfloat16: return ForwardRowsF<Bfloat16T>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kFloat: return ForwardRowsF<FloatT>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kDouble: return ForwardRowsD(t, p, out, row_begin, row_end, cols, eps);
  }
}

double SumTerms(Type type, const void* t, const void* p, int64_t n, double eps) {
  const float epsf = static_cast<float>(eps);
  switch (type) {
    case Type::kHalf:
      return SumTermsF<HalfT>(static_cast<const uint16_t*>(t), static_cast<const uint16_t*>(p), n, epsf);
    case Type::kBfloat16:
      return SumTermsF<Bfloat16T>(static_cast<const uint16_t*>(t), static_cast<const uint16_t*>(p), n,
                                  epsf);
    case Type::kFloat:
      return SumTermsF<FloatT>(static_cast<const float*>(t), static_cast<const float*>(p), n, epsf);
    case Type::kDouble:
      return SumTermsD(static_cast<const double*>(t), static_cast<const double*>(p), n, eps);
  }
  return 0.0;
}

void Gradient(Type type, const void* g, const void* t, const void* p, void* out, int64_t begin,
              int64_t end, int64_t cols, double eps, bool wrt_true) {
  const float epsf = static_cast<float>(eps);
  switch (type) {
    case Type::kHalf: return GradientF<HalfT>(g, t, p, out, begin, end, cols, epsf, wrt_true);
    case Type::kBfloat16: return GradientF<Bfloat16T>(g, t, p, out, begin, end, cols, epsf, wrt_true);
    case Type::kFloat: return GradientF<FloatT>(g, t, p, out, begin, end, cols, epsf, wrt_true);
    case Type::kDouble: return GradientD(g, t, p, out, begin, end, cols, eps, wrt_true);
  }
}

}  // namespace

const Kernels& TF_KLD_KERNELS_FN() {
  static const Kernels kernels = {TF_KLD_ISA_NAME, &ForwardRows, &SumTerms, &Gradient};
  return kernels;
}

}  // namespace cpu
}  // namespace tf_kld
