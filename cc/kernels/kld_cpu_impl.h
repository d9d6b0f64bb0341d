// The CPU kernel core, compiled once per ISA (see kld_cpu.h). Include it from exactly one .cc per
// ISA after defining TF_KLD_ISA_NAME ("generic", "avx2", "avx512"), TF_KLD_ISA_NAMESPACE
// (isa_generic, isa_avx2, isa_avx512) and TF_KLD_KERNELS_FN (the table getter).
//
// The AVX2 build of a helper must never be linked in place of the baseline one, so nothing here
// may become a symbol both ISA objects define: everything is in a namespace of its own ISA and has
// internal linkage (an anonymous namespace), and no libstdc++ inline function is called (an
// unoptimised build emits e.g. std::log(float) as a weak symbol in both objects, and the linker
// keeps one copy): the math goes through LibmLog and NearbyIntF below. tests/test_isa_objects.py
// checks the symbols of -O0 builds and runs the baseline kernels with the objects linked in both
// orders. SIMD is written with GCC vector extensions, one register wide: 16 float lanes with
// AVX-512, 8 with AVX, 4 with SSE2.
//
// float32 log: the rational approximation TensorFlow's CPU Log kernel uses (see Log below), with
// std::log in lanes that hold anything but positive normal numbers (0, Inf, NaN, negatives,
// subnormals: possible only with an unusual epsilon) and for the last cols % kLanes elements of
// each row (see VectorPart). float64 uses std::log throughout, as TensorFlow does.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "cc/kernels/kld.h"
#include "cc/kernels/kld_cpu.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors never cross a call boundary here.

namespace tf_kld {
namespace cpu {
namespace TF_KLD_ISA_NAMESPACE {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vf __attribute__((vector_size(4 * kLanes)));      // kLanes floats
typedef int32_t Vi __attribute__((vector_size(4 * kLanes)));    // lane masks: -1 true, 0 false
typedef uint32_t Vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t Vh __attribute__((vector_size(2 * kLanes)));   // kLanes 16-bit values
typedef double Vd __attribute__((vector_size(4 * kLanes)));     // kLanes / 2 doubles

#define TF_KLD_INLINE inline __attribute__((always_inline))

// libm by its C names (see the top of this file): internal wrappers, never shared between objects.
TF_KLD_INLINE float LibmLog(float x) { return __builtin_logf(x); }
TF_KLD_INLINE double LibmLog(double x) { return __builtin_log(x); }
TF_KLD_INLINE float NearbyIntF(float x) { return __builtin_nearbyintf(x); }

template <typename To, typename From>
TF_KLD_INLINE To BitCast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

TF_KLD_INLINE Vf Splat(float x) { return Vf{} + x; }

TF_KLD_INLINE bool AnyLane(Vi mask) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(BitCast<__m512i>(mask), BitCast<__m512i>(mask)) != 0;
#elif defined(__AVX__)
  return !_mm256_testz_si256(BitCast<__m256i>(mask), BitCast<__m256i>(mask));
#else
  return _mm_movemask_epi8(BitCast<__m128i>(mask)) != 0;
#endif
}

// Adds the float lanes into two double accumulators (low and high half of the lanes).
TF_KLD_INLINE void Accumulate(Vf terms, Vd* acc0, Vd* acc1) {
#if defined(__AVX512F__)  // vcvtps2pd of each half (the intrinsics trip GCC 12's -Wmaybe-uninitialized)
  *acc0 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 0, 1, 2, 3, 4, 5, 6, 7), Vd);
  *acc1 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 8, 9, 10, 11, 12, 13, 14, 15), Vd);
#elif defined(__AVX__)
  const __m256 v = BitCast<__m256>(terms);
  *acc0 += BitCast<Vd>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  *acc1 += BitCast<Vd>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#else
  *acc0 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 0, 1), Vd);
  *acc1 += __builtin_convertvector(__builtin_shufflevector(terms, terms, 2, 3), Vd);
#endif
}

// The sum of a row's double lanes, pairwise: ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
// with AVX-512, (a0 + a1) + (a2 + a3) with AVX, a0 + a1 with SSE2.
TF_KLD_INLINE double SumLanes(Vd acc) {
#if defined(__AVX512F__)
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
#elif defined(__AVX__)
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
#else
  return acc[0] + acc[1];
#endif
}

// Asks for the cache line kPrefetchBytes ahead of x: with two input streams per thread the hardware
// prefetchers alone leave ~10% of the memory bandwidth unused. A hint only: never faults.
constexpr int kPrefetchBytes = 4096;
TF_KLD_INLINE void Prefetch(const void* x) {
  __builtin_prefetch(static_cast<const char*>(x) + kPrefetchBytes);
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
    return sign | static_cast<uint16_t>(NearbyIntF(scaled));
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
// Element types: storage, scalar conversion, and kLanes-wide load/store in float.

struct HalfT {
  typedef uint16_t Storage;
  static float ToFloat(Storage v) { return HalfToFloat(v); }
  static Storage FromFloat(float v) { return FloatToHalf(v); }
  static TF_KLD_INLINE Vf Load(const Storage* p) {
#if defined(__AVX512F__)
    return BitCast<Vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
    return BitCast<Vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    Vf v;
    for (int i = 0; i < kLanes; ++i) v[i] = HalfToFloat(p[i]);
    return v;
#endif
  }
  static TF_KLD_INLINE void Store(Storage* p, Vf v) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(BitCast<__m512>(v), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
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
  // A bfloat16 is the top half of a float: loading puts each into the high 16 bits of a lane
  // (AVX-512: widen and shift; AVX2: one byte shuffle of the 16 bytes broadcast to both halves).
  static TF_KLD_INLINE Vf Load(const Storage* p) {
#if defined(__AVX512F__)
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return BitCast<Vf>(_mm512_slli_epi32(x, 16));
#elif defined(__AVX2__)
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i to_high = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,
                                             -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
    return BitCast<Vf>(_mm256_shuffle_epi8(x, to_high));
#else
    Vh h;
    std::memcpy(&h, p, sizeof(h));
    return BitCast<Vf>(__builtin_convertvector(h, Vu) << 16);
#endif
  }
  // 2 * kLanes bfloat16 as two vectors, the even-indexed elements and the odd-indexed ones: one
  // shift and one mask, no lane shuffles (an order for sums, where the order of the terms is free).
  static TF_KLD_INLINE void LoadPairs(const Storage* p, Vf* even, Vf* odd) {
    Vu x;
    std::memcpy(&x, p, sizeof(x));
    *even = BitCast<Vf>(x << 16);
    *odd = BitCast<Vf>(x & 0xffff0000u);
  }
  // The inverse of LoadPairs: 2 * kLanes bfloat16, each rounded as Store rounds it, from the
  // even-indexed values and the odd-indexed ones (no lane shuffles: one shift, one mask, one or).
  static TF_KLD_INLINE void StorePairs(Storage* p, Vf even, Vf odd) {
    const Vu x = (RoundedHigh(odd) & 0xffff0000u) | (RoundedHigh(even) >> 16);
    std::memcpy(p, &x, sizeof(x));
  }
  // v's bfloat16 (rounded to nearest even, NaN quieted) in the high 16 bits of each lane.
  static TF_KLD_INLINE Vu RoundedHigh(Vf v) {
    const Vu x = BitCast<Vu>(v);
    return (v != v) ? (x | 0x400000u) : x + 0x7fffu + ((x >> 16) & 1u);
  }
  static TF_KLD_INLINE void Store(Storage* p, Vf v) {
    const Vu r = RoundedHigh(v) >> 16;
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(BitCast<__m512i>(r)));
#elif defined(__AVX2__)
    // Every lane fits 16 bits: pack within each 128-bit half, then take both halves' low 64 bits.
    const __m256i packed = _mm256_packus_epi32(BitCast<__m256i>(r), BitCast<__m256i>(r));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
#else
    const Vh h = __builtin_convertvector(r, Vh);
    std::memcpy(p, &h, sizeof(h));
#endif
  }
};

struct FloatT {
  typedef float Storage;
  static float ToFloat(Storage v) { return v; }
  static Storage FromFloat(float v) { return v; }
  static TF_KLD_INLINE Vf Load(const Storage* p) {
    Vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static TF_KLD_INLINE void Store(Storage* p, Vf v) { std::memcpy(p, &v, sizeof(v)); }
};

// ---------------------------------------------------------------------------------------------
// float32 math, kLanes at a time.

// std::log in the lanes flagged special, keeping the others: each lane's result never depends
// on its neighbours, so grouping elements differently (threads, shards) gives the same bits.
TF_KLD_INLINE Vf FixSpecialLanes(Vf fast, Vf x, Vi special) {
  for (int i = 0; i < kLanes; ++i) {
    if (special[i]) fast[i] = LibmLog(x[i]);
  }
  return fast;
}

// a * b + c, fused (one rounding) where the build has FMA.
TF_KLD_INLINE Vf Madd(Vf a, Vf b, Vf c) {
#if defined(__AVX512F__)
  return BitCast<Vf>(_mm512_fmadd_ps(BitCast<__m512>(a), BitCast<__m512>(b), BitCast<__m512>(c)));
#elif defined(__FMA__)
  return BitCast<Vf>(_mm256_fmadd_ps(BitCast<__m256>(a), BitCast<__m256>(b), BitCast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// Natural log of kLanes floats: log(m * 2^e) = e * ln2 + log1p(f), f = m - 1 in [sqrt(1/2)-1, sqrt(2)-1),
// log1p(f) ~ f * P(f) / Q(f): the rational minimax form (and coefficients) of Eigen's plog, which
// TensorFlow's own Log kernel uses; the AVX2 build evaluates it with FMA (fewer instructions and
// roundings), the baseline build without, as TensorFlow's pip build does.
//
// kBounded: the caller guarantees every lane is a positive normal float or NaN (a ratio of values
// clipped to [eps, 1] with eps a normal float), so the special-lane check shrinks to keeping NaN.
template <bool kBounded = false>
TF_KLD_INLINE Vf Log(Vf x) {
  const Vu bits = BitCast<Vu>(x);
  // Positive normal finite <=> biased exponent in [1, 254] and sign clear.
  const Vi special = (bits - 0x00800000u) >= 0x7f000000u;
  const Vf m = BitCast<Vf>((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const Vi below = m < Splat(0.707106781186547524f);             // -1 where true
  const Vf e = __builtin_convertvector(BitCast<Vi>(bits >> 23) - 126 + below, Vf);
  const Vf f = (m - Splat(1.0f)) + BitCast<Vf>(BitCast<Vi>(m) & below);
  const Vf p = f * Madd(Madd(Splat(0.18256296349849254f), f, Splat(1.0000000190281063f)), f,
                        Splat(1.0000000190281136f));
  const Vf q = Madd(Madd(Madd(Splat(0.049616247954120038f), f, Splat(0.59923249590823520f)), f,
                         Splat(1.4999999999999927f)), f, Splat(1.0f));
  const Vf log = Madd(e, Splat(0.693147182f), p / q);
  if (kBounded) return log + (x - x);  // x - x is 0, or NaN where x is NaN
  return __builtin_expect(AnyLane(special), 0) ? FixSpecialLanes(log, x, special) : log;
}

// max(eps, min(1, x)); NaN passes through, as in tf.clip_by_value: minps/maxps return their second
// operand when either is NaN.
TF_KLD_INLINE Vf Clip(Vf x, Vf eps) {
#if defined(__AVX512F__)
  return BitCast<Vf>(_mm512_max_ps(BitCast<__m512>(eps),
                                   _mm512_min_ps(_mm512_set1_ps(1.0f), BitCast<__m512>(x))));
#elif defined(__AVX__)
  return BitCast<Vf>(_mm256_max_ps(BitCast<__m256>(eps),
                                   _mm256_min_ps(_mm256_set1_ps(1.0f), BitCast<__m256>(x))));
#else
  return BitCast<Vf>(_mm_max_ps(BitCast<__m128>(eps), _mm_min_ps(_mm_set1_ps(1.0f), BitCast<__m128>(x))));
#endif
}

// Where the clip passes the gradient: eps <= x <= 1 (false at NaN).
TF_KLD_INLINE Vi Inside(Vf x, Vf eps) { return (x >= eps) & (x <= Splat(1.0f)); }

template <bool kBounded>
TF_KLD_INLINE Vf Terms(Vf t, Vf p, Vf eps) {
  const Vf tc = Clip(t, eps);
  return tc * Log<kBounded>(tc / Clip(p, eps));
}

// Whether the clip range [eps, 1] makes every ratio tc / pc a positive normal float (or NaN).
TF_KLD_INLINE bool Bounded(float eps) { return eps >= 1.17549435e-38f && eps <= 1.0f; }

// Scalar float versions for a row's last n < kLanes elements. They use std::log, as TensorFlow's own
// kernels do for elements that do not fill a SIMD packet, so short rows match it exactly.
TF_KLD_INLINE float ClipF(float x, float eps) {
  const float upper = x > 1.0f ? 1.0f : x;
  return upper < eps ? eps : upper;
}

TF_KLD_INLINE float TermF(float t, float p, float eps) {
  const float tc = ClipF(t, eps);
  return tc * LibmLog(tc / ClipF(p, eps));
}

TF_KLD_INLINE float GradScalarF(float g, float t, float p, float eps, bool wrt_true) {
  const float tc = ClipF(t, eps);
  if (wrt_true) return t >= eps && t <= 1.0f ? g * (LibmLog(tc / ClipF(p, eps)) + 1.0f) : 0.0f;
  return p >= eps && p <= 1.0f ? -(g * tc) / p : 0.0f;
}

// Which log an element gets depends only on its index within its row: the first
// (cols / kLanes) * kLanes elements the vector log, the rest std::log, as TensorFlow's own kernels
// treat elements that do not fill a packet. Results therefore never depend on how rows or elements
// are split between threads, and short rows (the documented example) match TensorFlow exactly.
TF_KLD_INLINE int64_t VectorPart(int64_t cols) { return cols / kLanes * kLanes; }

// A row's sum: its vector part's (given) and then its last n % kLanes elements, in order.
template <typename E>
TF_KLD_INLINE double AddTailF(double sum, const typename E::Storage* t, const typename E::Storage* p,
                              int64_t n, float eps) {
  for (int64_t i = VectorPart(n); i < n; ++i) sum += TermF(E::ToFloat(t[i]), E::ToFloat(p[i]), eps);
  return sum;
}

template <typename E, bool kBounded>
TF_KLD_INLINE double SumTermsF(const typename E::Storage* t, const typename E::Storage* p, int64_t n,
                               float eps) {
  const Vf e = Splat(eps);
  Vd acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {  // two independent vectors in flight
    Prefetch(t + i), Prefetch(p + i);
    const Vf a = Terms<kBounded>(E::Load(t + i), E::Load(p + i), e);
    const Vf b = Terms<kBounded>(E::Load(t + i + kLanes), E::Load(p + i + kLanes), e);
    Accumulate(a, &acc0, &acc1);
    Accumulate(b, &acc0, &acc1);
  }
  if (i + kLanes <= n) Accumulate(Terms<kBounded>(E::Load(t + i), E::Load(p + i), e), &acc0, &acc1);
  return AddTailF<E>(SumLanes(acc0 + acc1), t, p, n, eps);
}

// Rows of exactly V vectors (V <= 4: 8 to 32 floats with AVX), R rows a step, all in registers:
// the R * V term vectors are independent work the CPU overlaps, and each row is then summed in the
// same order as SumTermsF (so a row's result never depends on the rows beside it).
template <typename E, bool kBounded, int V>
void ForwardShortRowsF(const typename E::Storage* t, const typename E::Storage* p,
                       typename E::Storage* loss, int64_t row_begin, int64_t row_end, float eps) {
  constexpr int R = V <= 2 ? 4 : 2;
  constexpr int64_t cols = V * kLanes;
  const Vf e = Splat(eps);
  int64_t r = row_begin;
  for (; r + R <= row_end; r += R) {
    const typename E::Storage* tr = t + r * cols;
    const typename E::Storage* pr = p + r * cols;
    Vf terms[R * V];
    for (int k = 0; k < R * V; ++k) {
      terms[k] = Terms<kBounded>(E::Load(tr + k * kLanes), E::Load(pr + k * kLanes), e);
    }
    for (int j = 0; j < R; ++j) {
      Vd acc0 = {}, acc1 = {};
      for (int v = 0; v < V; ++v) Accumulate(terms[j * V + v], &acc0, &acc1);
      loss[r + j] = E::FromFloat(static_cast<float>(SumLanes(acc0 + acc1)));
    }
  }
  for (; r < row_end; ++r) {
    loss[r] = E::FromFloat(static_cast<float>(SumTermsF<E, kBounded>(t + r * cols, p + r * cols, cols, eps)));
  }
}

// Rows narrower than this are done a block at a time: first the term vectors of all the block's
// rows (independent work the CPU can overlap), then each row's sum in the same order as SumTermsF,
// so the result of a row never depends on the block it falls in.
constexpr int64_t kBlockVectors = 64;

template <typename E, bool kBounded>
void ForwardRowsF(const void* y_true, const void* y_pred, void* out, int64_t row_begin,
                  int64_t row_end, int64_t cols, float eps) {
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  auto* loss = static_cast<typename E::Storage*>(out);
  const int64_t vectors = cols / kLanes;
  if (vectors == 0 || vectors > kBlockVectors / 2) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      loss[r] = E::FromFloat(static_cast<float>(SumTermsF<E, kBounded>(t + r * cols, p + r * cols, cols, eps)));
    }
    return;
  }
  switch (cols) {
    case kLanes: return ForwardShortRowsF<E, kBounded, 1>(t, p, loss, row_begin, row_end, eps);
    case 2 * kLanes: return ForwardShortRowsF<E, kBounded, 2>(t, p, loss, row_begin, row_end, eps);
    case 3 * kLanes: return ForwardShortRowsF<E, kBounded, 3>(t, p, loss, row_begin, row_end, eps);
    case 4 * kLanes: return ForwardShortRowsF<E, kBounded, 4>(t, p, loss, row_begin, row_end, eps);
    default: break;
  }
  const Vf e = Splat(eps);
  const int64_t block = kBlockVectors / vectors;
  Vf terms[kBlockVectors];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += block) {
    const int64_t r1 = r0 + block < row_end ? r0 + block : row_end;
    for (int64_t r = r0, k = 0; r < r1; ++r) {
      const int64_t base = r * cols;
      for (int64_t v = 0; v < vectors; ++v, ++k) {
        terms[k] = Terms<kBounded>(E::Load(t + base + v * kLanes), E::Load(p + base + v * kLanes), e);
      }
    }
    for (int64_t r = r0, k = 0; r < r1; ++r) {
      Vd acc0 = {}, acc1 = {};
      for (int64_t v = 0; v < vectors; ++v, ++k) Accumulate(terms[k], &acc0, &acc1);
      loss[r] = E::FromFloat(static_cast<float>(
          AddTailF<E>(SumLanes(acc0 + acc1), t + r * cols, p + r * cols, cols, eps)));
    }
  }
}

// The gradient as TensorFlow's autodiff forms it from the composite (Mul, Log, RealDiv and the
// clip's gradients), for eps <= 0 where the fused formulas differ from it (UseFusedGradient):
// scalar, as such an epsilon is unusual.
template <typename F>
TF_KLD_INLINE F AutodiffGrad(F g, F t, F p, F eps, bool wrt_true) {
  const F one = 1;
  const F t1 = t > one ? one : t, p1 = p > one ? one : p;  // min then max, NaN passing, as ClipF
  const F tc = t1 < eps ? eps : t1, pc = p1 < eps ? eps : p1;
  const F r = tc / pc;
  const F gr = g * tc * (one / r);
  if (wrt_true) return t >= eps && t <= one ? g * LibmLog(r) + gr / pc : F(0);
  return p >= eps && p <= one ? gr * (-tc / pc / pc) : F(0);
}

template <typename E>
TF_KLD_INLINE Vf GradF(Vf g, Vf t, Vf p, Vf eps, bool wrt_true) {
  const Vf tc = Clip(t, eps);
  const Vf zero = Splat(0.0f);
  if (wrt_true) return Inside(t, eps) ? g * (Log(tc / Clip(p, eps)) + Splat(1.0f)) : zero;
  return Inside(p, eps) ? -(g * tc) / p : zero;
}

// The gradient over flat elements [begin, end), which may start and end mid-row.
template <typename E>
void GradientF(const void* grad, const void* y_true, const void* y_pred, void* out, int64_t begin,
               int64_t end, int64_t cols, float eps, bool wrt_true) {
  const auto* g = static_cast<const typename E::Storage*>(grad);
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  auto* o = static_cast<typename E::Storage*>(out);
  if (!UseFusedGradient(eps)) {
    for (int64_t i = begin; i < end; ++i) {
      o[i] = E::FromFloat(AutodiffGrad<float>(E::ToFloat(g[i / cols]), E::ToFloat(t[i]),
                                              E::ToFloat(p[i]), eps, wrt_true));
    }
    return;
  }
  const Vf e = Splat(eps);
  if (!wrt_true && cols < kLanes) {
    // No log in this gradient, so narrow rows can share vectors; the row's upstream gradient is
    // expanded to one value per element first.
    float expanded[kLanes];
    for (int64_t i = begin, row = begin / cols, c = begin % cols; i < end; i += kLanes) {
      const int64_t n = end - i < kLanes ? end - i : kLanes;
      for (int64_t j = 0; j < n; ++j) {
        expanded[j] = E::ToFloat(g[row]);
        if (++c == cols) c = 0, ++row;
      }
      if (n == kLanes) {
        E::Store(o + i, GradF<E>(FloatT::Load(expanded), E::Load(t + i), E::Load(p + i), e, false));
      } else {
        for (int64_t j = 0; j < n; ++j) {
          o[i + j] = E::FromFloat(
              GradScalarF(expanded[j], E::ToFloat(t[i + j]), E::ToFloat(p[i + j]), eps, false));
        }
      }
    }
    return;
  }
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t row_start = row * cols;
    const int64_t stop = row_start + cols < end ? row_start + cols : end;
    const int64_t vector_stop = row_start + VectorPart(cols) < stop ? row_start + VectorPart(cols) : stop;
    const float gs = E::ToFloat(g[row]);
    const Vf gv = Splat(gs);
    for (; i + kLanes <= vector_stop; i += kLanes) {
      Prefetch(t + i), Prefetch(p + i);
      E::Store(o + i, GradF<E>(gv, E::Load(t + i), E::Load(p + i), e, wrt_true));
    }
    if (i < vector_stop) {  // a row cut by [begin, end): still the vector log, in a padded vector
      const int64_t n = vector_stop - i;
      Vf tv = Splat(1.0f), pv = Splat(1.0f);
      for (int64_t j = 0; j < n; ++j) tv[j] = E::ToFloat(t[i + j]), pv[j] = E::ToFloat(p[i + j]);
      const Vf r = GradF<E>(gv, tv, pv, e, wrt_true);
      for (int64_t j = 0; j < n; ++j) o[i + j] = E::FromFloat(r[j]);
      i = vector_stop;
    }
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
    acc0 += t0 * LibmLog(t0 / ClipD(p[i], eps));
    acc1 += t1 * LibmLog(t1 / ClipD(p[i + 1], eps));
  }
  if (i < n) {
    const double t0 = ClipD(t[i], eps);
    acc0 += t0 * LibmLog(t0 / ClipD(p[i], eps));
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
  if (!UseFusedGradient(eps)) {
    for (int64_t i = begin; i < end; ++i) o[i] = AutodiffGrad<double>(g[i / cols], t[i], p[i], eps, wrt_true);
    return;
  }
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const double gv = g[row];
    if (wrt_true) {
      for (; i < stop; ++i) {
        const double tc = ClipD(t[i], eps);
        o[i] = InsideD(t[i], eps) ? gv * (LibmLog(tc / ClipD(p[i], eps)) + 1.0) : 0.0;
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

template <typename E>
void ForwardRowsE(const void* t, const void* p, void* out, int64_t row_begin, int64_t row_end,
                  int64_t cols, float eps) {
  if (Bounded(eps)) return ForwardRowsF<E, true>(t, p, out, row_begin, row_end, cols, eps);
  ForwardRowsF<E, false>(t, p, out, row_begin, row_end, cols, eps);
}

template <typename E>
double SumTermsE(const void* t, const void* p, int64_t n, float eps) {
  const auto* ts = static_cast<const typename E::Storage*>(t);
  const auto* ps = static_cast<const typename E::Storage*>(p);
  return Bounded(eps) ? SumTermsF<E, true>(ts, ps, n, eps) : SumTermsF<E, false>(ts, ps, n, eps);
}

void ForwardRows(Type type, const void* t, const void* p, void* out, int64_t row_begin,
                 int64_t row_end, int64_t cols, double eps) {
  const float epsf = static_cast<float>(eps);
  switch (type) {
    case Type::kHalf: return ForwardRowsE<HalfT>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kBfloat16: return ForwardRowsE<Bfloat16T>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kFloat: return ForwardRowsE<FloatT>(t, p, out, row_begin, row_end, cols, epsf);
    case Type::kDouble: return ForwardRowsD(t, p, out, row_begin, row_end, cols, eps);
  }
}

double SumTerms(Type type, const void* t, const void* p, int64_t n, double eps) {
  const float epsf = static_cast<float>(eps);
  switch (type) {
    case Type::kHalf: return SumTermsE<HalfT>(t, p, n, epsf);
    case Type::kBfloat16: return SumTermsE<Bfloat16T>(t, p, n, epsf);
    case Type::kFloat: return SumTermsE<FloatT>(t, p, n, epsf);
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
}  // namespace TF_KLD_ISA_NAMESPACE

const Kernels& TF_KLD_KERNELS_FN() {
  static const Kernels kernels = {TF_KLD_ISA_NAME, &TF_KLD_ISA_NAMESPACE::ForwardRows,
                                  &TF_KLD_ISA_NAMESPACE::SumTerms, &TF_KLD_ISA_NAMESPACE::Gradient};
  return kernels;
}

}  // namespace cpu
}  // namespace tf_kld
