// The distillation family's CPU core (see distill_cpu.h), compiled once per ISA: included by
// kld_cpu_generic.cc, kld_cpu_avx2.cc and kld_cpu_avx512.cc right after kld_cpu_impl.h, whose SIMD helpers (vector
// types, 16-bit loads and stores, Madd, Accumulate) it uses from the same anonymous namespace.
// Its table getter is distill::TF_KLD_KERNELS_FN (GenericKernels / Avx2Kernels / Avx512Kernels).
//
// Arithmetic per element: one division by T (skipped at T = 1), two vectorised exps, and a
// rescaling exp only when a lane's running maximum grows; one log per row. float16/bfloat16/float32
// compute in float32 and accumulate the three sums in double; float64 is scalar, std::exp.

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cc/kernels/distill_cpu.h"
#if defined(__AVX512F__)
#include "cc/kernels/linear_bf16_dp.h"  // its own target: picked only where the CPU has AVX512_BF16
#endif

namespace tf_kld {
namespace cpu {
namespace TF_KLD_ISA_NAMESPACE {  // as kld_cpu_impl.h: no symbol shared between ISA objects
namespace {

// exp of kLanes floats, within about 1 ulp, NaN kept (every clamp below returns x where x is NaN:
// vmaxps/vminps return their second operand where either is NaN). exp(x) = 2^(k/K) exp(r) with
// k = rint(K x log2 e) and r = x - k ln2/K (ln 2 in two parts; k ln2/K exact for every clamped x).
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// The range reduction both table-driven exps share: x clamped to [-110, 89], where exp is 0 and inf
// in float (kHigh false: x <= 89 known, the upper clamp left out); t = K x log2 e + 1.5 * 2^23,
// whose low bits are k's (the table's index); k; and r.
template <int K, bool kHigh = true>
TF_KLD_INLINE Vf ExpReduce(Vf x, Vf* t, Vf* k) {
#if defined(__AVX512F__)
  Vf xc = BitCast<Vf>(_mm512_max_ps(_mm512_set1_ps(-110.0f), BitCast<__m512>(x)));
  if (kHigh) xc = BitCast<Vf>(_mm512_min_ps(_mm512_set1_ps(89.0f), BitCast<__m512>(xc)));
#else
  Vf xc = BitCast<Vf>(_mm256_max_ps(_mm256_set1_ps(-110.0f), BitCast<__m256>(x)));
  if (kHigh) xc = BitCast<Vf>(_mm256_min_ps(_mm256_set1_ps(89.0f), BitCast<__m256>(xc)));
#endif
  const Vf magic = Splat(12582912.0f);  // 1.5 * 2^23
  *t = Madd(xc, Splat(static_cast<float>(K * 1.4426950408889634)), magic);
  *k = *t - magic;
  const Vf r = Madd(*k, Splat(-0.693359375f / K), xc);  // ln 2 / K in two parts
  return Madd(*k, Splat(2.12194440e-4f / K), r);
}
#endif

#if defined(__AVX512F__)
alignas(64) constexpr float kExp2Sixteenths[16] = {  // 2^(j/16), rounded to float
    1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f,
    1.1892070770263672f, 1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f,
    1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f,
    1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};

// K = 16: |r| <= ln2/32, where exp(r) - 1 = r (1 + r/2 + r^2/6) is within 0.01 ulp; 2^(j/16) for
// j = k mod 16 from a 16-entry table (one vpermps), and 2^floor(k/16) by vscalefps, which multiplies
// in one rounding, so overflow, subnormal results and 0 come out right with no special lanes.
// Measured worst 1.07 ulp. Fewer floating-point operations than the degree-6 form below: on cores
// with one 512-bit FMA unit, they bound the loops.
// 2^(j/16) (1 + em1), j = k mod 16 from t's low bits, em1 added to 1 only in the last
// multiply-add (one rounding). Every exp below ends with it.
TF_KLD_INLINE __m512 TableTimes(Vf em1, Vf t) {
  const Vf two_j = BitCast<Vf>(_mm512_permutexvar_ps(BitCast<__m512i>(t), _mm512_load_ps(kExp2Sixteenths)));
  return BitCast<__m512>(Madd(two_j, em1, two_j));
}

// 2^(j/16) exp(r): exp(r) - 1 = r (1 + r/2 + r^2/6).
TF_KLD_INLINE __m512 TableTimesExp(Vf r, Vf t) {
  return TableTimes(Madd(Madd(Splat(1.0f / 6), r, Splat(0.5f)), r, Splat(1.0f)) * r, t);
}

TF_KLD_INLINE Vf ExpF(Vf x) {
  Vf t, k;
  const Vf r = ExpReduce<16>(x, &t, &k);
  return BitCast<Vf>(_mm512_scalef_ps(TableTimesExp(r, t), BitCast<__m512>(k * Splat(0.0625f))));
}

// exp(x) for x <= 0 or NaN (the shifted logits the gradient loops take the exp of): ExpF's
// arithmetic less its upper clamp, with t = x log2 e + 1.5 * 2^19 rounded to a multiple of 1/16
// (t / 16 of ExpF's t, exactly: the same k, the same low bits for the table), so k / 16 is
// t - 1.5 * 2^19 (an add, not a multiply) and r comes from k / 16 (the same products as
// k * (ln 2 / 16)): two operations fewer per call (the upper clamp and a multiply), the same bits as
// ExpF for every x <= 89.
TF_KLD_INLINE Vf ExpNonPositive(Vf x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-110.0f), BitCast<__m512>(x));
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(static_cast<float>(1.4426950408889634)),
                                   _mm512_set1_ps(786432.0f));
  const __m512 k16 = _mm512_sub_ps(t, _mm512_set1_ps(786432.0f));
  __m512 r = _mm512_fmadd_ps(k16, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(k16, _mm512_set1_ps(2.12194440e-4f), r);
  return BitCast<Vf>(_mm512_scalef_ps(TableTimesExp(BitCast<Vf>(r), BitCast<Vf>(t)), k16));
}

// e^(d / T) = 2^(d scale) (scale = log2(e) / T) for every d <= 0 but -inf (in the lanes outside
// `keep`: 0), NaN kept: the forward's exp of distances to the raw maxima (KlArgs). t = d scale +
// 1.5 * 2^19 (one multiply-add) rounds d scale to k16, a multiple of 1/16 whose low bits index the
// table, and r = d scale - k16 is one more multiply-add, rounded once (|r| <= 1/32): no ln 2 in two
// parts and no rounding of d scale itself; 2^r - 1 = r (c1 + r (c2 + r c3)) with c_i = ln(2)^i / i!,
// the same degree and range (r ln 2 <= ln2/32) as TableTimesExp. No lower clamp: below -160 the
// table index and r lose their meaning but stay finite, and the vscalefps by 2^floor(k16) <= 2^-160
// gives 0; -inf (r = NaN) would give NaN, so its lanes are the ones `keep` zeroes.
TF_KLD_INLINE Vf Exp2Scaled(Vf d, Vf scale, __mmask16 keep) {
  const __m512 x = BitCast<__m512>(d), s = BitCast<__m512>(scale);
  const __m512 t = _mm512_fmadd_ps(x, s, _mm512_set1_ps(786432.0f));
  const __m512 k16 = _mm512_sub_ps(t, _mm512_set1_ps(786432.0f));
  const Vf r = BitCast<Vf>(_mm512_fmsub_ps(x, s, k16));
  const Vf em1 = Madd(Madd(Splat(0.0555041086648216f), r, Splat(0.2402265069591007f)), r,
                      Splat(0.6931471805599453f)) * r;
  return BitCast<Vf>(_mm512_maskz_scalef_ps(keep, TableTimes(em1, BitCast<Vf>(t)), k16));
}
#elif defined(__AVX2__) && defined(__FMA__)
// K = 8: an 8-entry table (vpermps), a quartic (|r| <= ln2/16), and 2^m = 2^floor(k/8) as
// 2^m1 * 2^m2 (m1 = floor(m/2)) built from bits: both factors are normal floats for every clamped x,
// the first product is exact and the second rounds once, so subnormal results, 0 and overflow are
// right with no special lanes. Measured worst 0.92 ulp. kHigh false: x <= 89 known (ExpNonPositive).
template <bool kHigh = true>
TF_KLD_INLINE Vf ExpF(Vf x) {
  alignas(32) static constexpr float kExp2Eighths[8] = {  // 2^(j/8), rounded to float
      1.0f, 1.0905077457427979f, 1.1892070770263672f, 1.2968395948410034f,
      1.4142135381698608f, 1.5422108173370361f, 1.6817928552627563f, 1.8340080976486206f};
  Vf t, k;
  const Vf r = ExpReduce<8, kHigh>(x, &t, &k);
  const Vf em1 =
      Madd(Madd(Madd(Splat(1.0f / 24), r, Splat(1.0f / 6)), r, Splat(0.5f)), r, Splat(1.0f)) * r;
  const Vf two_j = BitCast<Vf>(_mm256_permutevar8x32_ps(_mm256_load_ps(kExp2Eighths), BitCast<__m256i>(t)));
  const Vi m = __builtin_convertvector(k, Vi) >> 3;  // floor(k / 8), k an exact integer
  const Vi m1 = m >> 1, m2 = m - m1;
  return Madd(two_j, em1, two_j) * BitCast<Vf>((m1 + 127) << 23) * BitCast<Vf>((m2 + 127) << 23);
}
#else
// K = 1 (Cephes' expf, SSE2 has no lane permute): a degree-6 polynomial, 2^k from its bits; x <= -104
// gives 0 (below half the smallest subnormal), and the rare lanes in (-104, -87.3) (subnormal
// results) and above 88 (near overflow) take libm's expf.
TF_KLD_INLINE Vf ExpF(Vf x) {
  const Vf lo = Splat(-87.3365479f), hi = Splat(88.0f);
  Vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const Vi ni = BitCast<Vi>(_mm_cvtps_epi32(BitCast<__m128>(xc * Splat(1.44269504088896341f))));
  const Vf n = __builtin_convertvector(ni, Vf);
  Vf r = Madd(n, Splat(-0.693359375f), xc);
  r = Madd(n, Splat(2.12194440e-4f), r);
  Vf y = Splat(1.9875691500E-4f);
  y = Madd(y, r, Splat(1.3981999507E-3f));
  y = Madd(y, r, Splat(8.3334519073E-3f));
  y = Madd(y, r, Splat(4.1665795894E-2f));
  y = Madd(y, r, Splat(1.6666665459E-1f));
  y = Madd(y, r, Splat(5.0000001201E-1f));
  y = Madd(y, r * r, r) + Splat(1.0f);
  Vf e = y * BitCast<Vf>((ni + 127) << 23);
  e = x <= Splat(-104.0f) ? Splat(0.0f) : e;
  e = x != x ? x : e;
  const Vi rare = ((x > Splat(-104.0f)) & (x < lo)) | (x > hi);
  if (__builtin_expect(AnyLane(rare), 0)) {
    for (int i = 0; i < kLanes; ++i) {
      if (rare[i]) e[i] = expf(x[i]);  // libm's C name: no inline std:: symbol
    }
  }
  return e;
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// exp(x) for x <= 0 or NaN: ExpF less its upper clamp (the same bits for every x <= 89).
TF_KLD_INLINE Vf ExpNonPositive(Vf x) { return ExpF<false>(x); }
#elif !defined(__AVX512F__)
// exp(x) for x <= 0 or NaN: ExpF.
TF_KLD_INLINE Vf ExpNonPositive(Vf x) { return ExpF(x); }
#endif

// x / T for logits: nothing at T = 1, a multiplication where 1/T is exact (T a power of two, 2^-125
// to 2^125: the same bits as the division, a fraction of its cost), else the division.
struct Divider {
  enum Mode { kNone, kMultiply, kDivide } mode;
  Vf t, inv;

  explicit Divider(float temperature) : t(Splat(temperature)), inv(Splat(1.0f / temperature)) {
    const uint32_t bits = BitCast<uint32_t>(temperature);
    const uint32_t exponent = bits >> 23;  // sign clear: temperatures are positive
    mode = temperature == 1.0f                                              ? kNone
           : (bits & 0x7fffffu) == 0 && exponent >= 2 && exponent <= 252    ? kMultiply
                                                                            : kDivide;
  }
  TF_KLD_INLINE Vf operator()(Vf x) const {
    return mode == kNone ? x : mode == kMultiply ? x * inv : x / t;
  }
  template <int M>
  TF_KLD_INLINE Vf Apply(Vf x) const {
    return M == kNone ? x : M == kMultiply ? x * inv : x / t;
  }
  // f(ModeTag<mode>()): a loop built inside f tests the mode once, not per element.
  template <int M>
  struct ModeTag {
    static constexpr int kMode = M;
  };
  template <typename F>
  TF_KLD_INLINE auto Dispatch(F f) const {
    return mode == kNone ? f(ModeTag<kNone>()) : mode == kMultiply ? f(ModeTag<kMultiply>())
                                                                   : f(ModeTag<kDivide>());
  }
};

// A float vector as doubles in the lane split Accumulate uses: lanes [0, kLanes/2) and the rest.
TF_KLD_INLINE void Widen(Vf v, Vd* lo, Vd* hi) {
  Vd zero0 = {}, zero1 = {};
  Accumulate(v, &zero0, &zero1);
  *lo = zero0, *hi = zero1;
}

// e^x in double for x <= 0, within 1.2 double ulps; 0 below -708 (and at -inf), NaN for NaN.
// The factors that move a lane's double sums to a new maximum (KlLanes::ScaleD): rare, so plain
// vector code. n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts, n ln2_hi exact), e^r by its
// Taylor series to r^13 (|r| <= ln 2 / 2: the rest below 5e-18), times 2^n made in the exponent
// bits (n >= -1022 here).
TF_KLD_INLINE Vd ExpNonPositiveD(Vd x) {
  typedef int64_t Vl __attribute__((vector_size(sizeof(Vd))));
  const Vd zero = Vd{}, floor = zero - 708.0;
  const Vd xc = x < floor ? floor : x;
  const Vd shifter = zero + 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const Vd ks = xc * 1.4426950408889634 + shifter;
  const Vd n = ks - shifter;
  const Vd r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  constexpr double kInverseFactorials[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                           1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
                                           1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
  Vd p = zero + kInverseFactorials[0];
  for (int i = 1; i < 14; ++i) p = p * r + kInverseFactorials[i];
  const Vl two_n = (BitCast<Vl>(ks) - BitCast<Vl>(shifter) + 1023) << 52;
  const Vd e = p * BitCast<Vd>(two_n);
  return x < floor ? zero : (x == x ? e : x);
}


// The per-lane state of a row piece, kLanes elements a step, at running maxima the lanes share
// (Raise; the narrow rows' path sets one row's final maxima per lane instead, and never raises
// them). The sums run in float for kFlushSteps steps (at most that many terms per lane, so a few
// float ulps), then go into double.
// NaN and +inf logits need no test: they make a sum NaN (exp(NaN), or inf - inf at a +inf maximum),
// masked or not, and Finish turns a NaN sum into a NaN row.
constexpr int kFlushSteps = 8;

// KlPartial's cross term, sum e^(a - max_a) (a - b), from the lanes' sum e^(a - max_a)
// ((a - max_a) - (b - max_b)) (see KlLanes::Rebase): the maxima's difference added once, in
// double, where both are finite (else the row's result is NaN whatever the cross term).
// Finiteness as x - x == 0, not std::isfinite: at -O0 that is an out-of-line symbol another ISA's
// object could bind to.
TF_KLD_INLINE double CrossOfLogits(double cross, double max_a, double max_b, double sum_a) {
  const double maxima = max_a - max_b;
  return maxima - maxima == 0.0 ? cross + maxima * sum_a : cross;
}

// A row's raw float maximum as its stat, max / T (the float temperature, in double), and back: the
// product is within two double ulps of a float, so RawMax(MaxStat(m, t), t) == m exactly.
TF_KLD_INLINE double MaxStat(float max, float temperature) {
  return static_cast<double>(max) / static_cast<double>(temperature);
}
TF_KLD_INLINE float RawMax(double max_over_t, float temperature) {
  return static_cast<float>(max_over_t * static_cast<double>(temperature));
}

// The forward's loop f(Divider::ModeTag<mode>()) for the temperature: one loop on AVX-512, whose
// KlArgs multiplies at any T; elsewhere one per Divider mode.
template <typename F>
TF_KLD_INLINE void ForwardLoop(float temperature, F f) {
#if defined(__AVX512F__)
  (void)temperature;
  f(Divider::ModeTag<Divider::kMultiply>());
#else
  Divider(temperature).Dispatch(f);
#endif
}

// The forward's exps and cross-term distances, from distances d to the running maxima of the raw
// logits (not of x / T: exact where they count, whatever T, and no division per element). On
// AVX-512 the exps are Exp2Scaled's (d times log2(e) / T inside the reduction: two multiply-adds
// fewer per exp, no ln 2 in two parts) and the cross term sums raw distances, scaled by 1/T once
// (unit); elsewhere d is divided by T (Divider mode kMode) for ExpNonPositive and the cross term.
// The scale's rounding (2^-24, the same for every element) moves the KL as a change of T by as
// much would.
template <int kMode>
struct KlArgs {
#if defined(__AVX512F__)
  Vf scale;
  double unit;
  // natural: the exps' exponent per raw unit (scale times ln 2, exactly as the exps take it);
  // cross_unit: the cross term's per raw unit (raw distances).
  double natural, cross_unit = 1.0;
  explicit KlArgs(float temperature)
      : scale(Splat(static_cast<float>(1.4426950408889634 / temperature))), unit(1.0 / temperature),
        natural(static_cast<double>(scale[0]) * 0.6931471805599453) {}
  // The cross term's distance.
  TF_KLD_INLINE Vf operator()(Vf d) const { return d; }
  // e^(d / T) in the lanes of `keep` (d > -inf there), else 0.
  TF_KLD_INLINE Vf Exp(Vf d, __mmask16 keep) const { return Exp2Scaled(d, scale, keep); }
#else
  Divider by_t;
  double unit = 1.0;
  // natural: the exps' exponent per raw unit; cross_unit: the cross term's (both 1 / T).
  double natural, cross_unit;
  explicit KlArgs(float temperature)
      : by_t(temperature), natural(1.0 / static_cast<double>(temperature)), cross_unit(natural) {}
  TF_KLD_INLINE Vf operator()(Vf d) const { return by_t.Apply<kMode>(d); }
#endif
};

template <int kMode>
struct KlLanes {
  KlArgs<kMode> arg;
  float temperature;
  Vf max_a = Splat(-INFINITY), max_b = Splat(-INFINITY);  // of the raw logits
  Vf fsum_a = {}, fcross = {}, fsum_b = {};
  Vd sum_a0 = {}, sum_a1 = {}, cross0 = {}, cross1 = {}, sum_b0 = {}, sum_b1 = {};
#if defined(__AVX512F__)
  __mmask16 infinite = 0;  // lanes with a class of p > 0, q = 0 (a mask register here)
#else
  Vi infinite = {};
#endif
  int steps = 0;

  explicit KlLanes(float t) : arg(t), temperature(t) {}

  // One step of raw logits a (y_true) and b (y_pred).
#if defined(__AVX512F__)
  // As below, with the lane tests in mask registers (no mask <-> vector moves).
  TF_KLD_INLINE void Step(Vf a, Vf b) {
    const __m512 va = BitCast<__m512>(a), vb = BitCast<__m512>(b);
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    const __mmask16 masked_a = _mm512_cmp_ps_mask(va, minus_inf, _CMP_EQ_OQ);
    const __mmask16 masked_b = _mm512_cmp_ps_mask(vb, minus_inf, _CMP_EQ_OQ);
    const __mmask16 up = _mm512_cmp_ps_mask(va, BitCast<__m512>(max_a), _CMP_GT_OQ) |
                         _mm512_cmp_ps_mask(vb, BitCast<__m512>(max_b), _CMP_GT_OQ);
    if (__builtin_expect(up != 0, 0)) Raise(a, b, a > max_a, b > max_b);
    infinite |= static_cast<__mmask16>(masked_b & ~masked_a);
    const Vf da = a - max_a, db = b - max_b;
    const Vf ea = arg.Exp(da, static_cast<__mmask16>(~masked_a));
    const Vf eb = arg.Exp(db, static_cast<__mmask16>(~masked_b));
    fsum_a += ea;
    fsum_b += eb;
    fcross = BitCast<Vf>(_mm512_mask3_fmadd_ps(BitCast<__m512>(ea), BitCast<__m512>(arg(da - db)), BitCast<__m512>(fcross),
                                               static_cast<__mmask16>(~(masked_a | masked_b))));
    if (++steps == kFlushSteps) Flush();
  }
#else
  TF_KLD_INLINE void Step(Vf a, Vf b) {
    const Vf minus_inf = Splat(-INFINITY), zero = Splat(0.0f);
    const Vi masked_a = a == minus_inf, masked_b = b == minus_inf;
    infinite |= masked_b & ~masked_a;
    const Vi up_a = a > max_a, up_b = b > max_b;
    if (__builtin_expect(AnyLane(up_a | up_b), 0)) Raise(a, b, up_a, up_b);
    // Masked classes: exp 0, and no 0 * inf in the cross term.
    const Vf ua = arg(a - max_a), ub = arg(b - max_b);
    const Vf ea = masked_a ? zero : ExpNonPositive(ua);
    const Vf eb = masked_b ? zero : ExpNonPositive(ub);
    fsum_a += ea;
    fcross += (masked_a | masked_b) ? zero : ea * (ua - ub);
    fsum_b += eb;
    if (++steps == kFlushSteps) Flush();
  }
#endif

  // e^((from - to) / T) in double, splat, for a new maximum `to` >= `from`: the factor that moves
  // the lanes' double sums, in the units of the elements' exps (KlArgs::natural), from the maxima's
  // exact difference. A float factor (the exps' own) put up to a float ulp of the whole sum so far
  // into every move, independently for y_true's and y_pred's sums, so into their log-sums'
  // difference: 3-6 times the rest of the KL's error at 32000 classes.
  TF_KLD_INLINE Vd ScaleD(float from, float to) const {
    return ExpNonPositiveD(Vd{} + (static_cast<double>(from) - static_cast<double>(to)) * arg.natural);
  }

  // New running maxima, shared by the lanes (a row's records, about log n of them, where a
  // maximum per lane moved about kLanes times as often): the float partials flushed, the double
  // sums' cross-term distances moved to them and the sums rescaled to them by one factor each.
  TF_KLD_INLINE void Raise(Vf a, Vf b, Vi up_a, Vi up_b) {
    const float old_a = max_a[0], old_b = max_b[0];
    float new_a = old_a, new_b = old_b;
    for (int i = 0; i < kLanes; ++i) {
      new_a = up_a[i] && a[i] > new_a ? a[i] : new_a;  // NaN never raises a maximum
      new_b = up_b[i] && b[i] > new_b ? b[i] : new_b;
    }
    Flush();
    Rebase(old_a, new_a, old_b, new_b);
    if (new_a != old_a) {
      const Vd s = ScaleD(old_a, new_a);
      sum_a0 *= s, sum_a1 *= s, cross0 *= s, cross1 *= s;
      max_a = Splat(new_a);
    }
    if (new_b != old_b) {
      const Vd s = ScaleD(old_b, new_b);
      sum_b0 *= s, sum_b1 *= s;
      max_b = Splat(new_b);
    }
  }

  // The cross term sums e^(a - max_a) ((a - max_a) - (b - max_b)) at the running maxima (in
  // KlArgs' units), not e^(a - max_a) (a - b): the distances are exact where they count, where
  // a - b would round to the logits' magnitude (teacher logits offset by 1e4 from the student's
  // lost three decimal digits of the KL that way). Where the maxima move, each term so far moves
  // by delta = (old max_a - new max_a) - (old max_b - new max_b) (raw units, exact in double): the
  // sums of e^(a - max_a) times delta (in KlArgs' units) are added (none where delta is infinite
  // or NaN: no term yet). The float partials are flushed first.
  TF_KLD_INLINE void Rebase(float old_a, float new_a, float old_b, float new_b) {
    const double delta = (static_cast<double>(old_a) - static_cast<double>(new_a)) -
                         (static_cast<double>(old_b) - static_cast<double>(new_b));
    if (delta - delta == 0.0) {
      const Vd d = Vd{} + delta * arg.cross_unit;
      cross0 += d * sum_a0, cross1 += d * sum_a1;
    }
  }

  // 1 in the lanes with a class of p > 0, q = 0 (+inf), else 0.
  TF_KLD_INLINE Vf InfiniteLanes() const {
#if defined(__AVX512F__)
    return BitCast<Vf>(_mm512_maskz_mov_ps(infinite, _mm512_set1_ps(1.0f)));
#else
    return infinite ? Splat(1.0f) : Splat(0.0f);
#endif
  }

  TF_KLD_INLINE void Flush() {
    Accumulate(fsum_a, &sum_a0, &sum_a1);
    Accumulate(fcross, &cross0, &cross1);
    Accumulate(fsum_b, &sum_b0, &sum_b1);
    fsum_a = fcross = fsum_b = Splat(0.0f);
    steps = 0;
  }

  // The lanes merged: they share their maxima (Raise), so by plain sums. KlPartial's maxima are
  // the raw ones divided by T in double (the gradient ops recover the raw float maxima from them
  // exactly: RawMax), its cross term in natural units.
  distill::KlPartial Reduce() {
    Flush();
    distill::KlPartial r;
    const float ma = max_a[0], mb = max_b[0];
    r.max_a = MaxStat(ma, temperature), r.max_b = MaxStat(mb, temperature);
    r.sum_a = SumLanes(sum_a0 + sum_a1);
    r.cross = CrossOfLogits(arg.unit * SumLanes(cross0 + cross1), r.max_a, r.max_b, r.sum_a);
    r.sum_b = SumLanes(sum_b0 + sum_b1);
#if defined(__AVX512F__)
    r.infinite = infinite != 0;
#else
    r.infinite = AnyLane(infinite);
#endif
    return r;
  }
};

// Up to kLanes elements of a row into a vector, the rest padded with -inf (which adds nothing).
template <typename E>
TF_KLD_INLINE Vf LoadPadded(const typename E::Storage* x, int64_t n, float pad) {
  float v[kLanes];
  for (int i = 0; i < kLanes; ++i) v[i] = i < n ? E::ToFloat(x[i]) : pad;
  return FloatT::Load(v);
}

// 2 * kLanes floats as two vectors, the even-indexed elements and the odd-indexed ones (two lane
// permutes): the lanes Bfloat16T::LoadPairs gives, so that a float32 row's partial is its
// bfloat16 row's, bit for bit, wherever the float32 row holds that row's values.
template <int... I>
constexpr Vi EveryOther(int first, std::integer_sequence<int, I...>) { return Vi{(first + 2 * I)...}; }

TF_KLD_INLINE void LoadFloatPairs(const float* p, Vf* even, Vf* odd) {
  constexpr Vi kEven = EveryOther(0, std::make_integer_sequence<int, kLanes>());
  constexpr Vi kOdd = EveryOther(1, std::make_integer_sequence<int, kLanes>());
  const Vf x0 = FloatT::Load(p), x1 = FloatT::Load(p + kLanes);
  *even = __builtin_shuffle(x0, x1, kEven);
  *odd = __builtin_shuffle(x0, x1, kOdd);
}

template <typename E>
distill::KlPartial KlPartialF(const void* y_true, const void* y_pred, int64_t n, float temperature) {
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  distill::KlPartial result;
  ForwardLoop(temperature, [&](auto mode) {
    KlLanes<decltype(mode)::kMode> s(temperature);
    int64_t i = 0;
    // bfloat16 rows go in another order of their terms (even- and odd-indexed elements), widened
    // cheaper that way (a shift and a mask); float32 rows in the same order (two lane permutes), so
    // a bfloat16 row's result is the float32 result of its widened values, bit for bit.
    if constexpr (std::is_same<E, Bfloat16T>::value || std::is_same<E, FloatT>::value) {
      for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
        Prefetch(t + i), Prefetch(p + i);
        Vf t_even, t_odd, p_even, p_odd;
        if constexpr (std::is_same<E, Bfloat16T>::value) {
          Bfloat16T::LoadPairs(t + i, &t_even, &t_odd);
          Bfloat16T::LoadPairs(p + i, &p_even, &p_odd);
        } else {
          LoadFloatPairs(t + i, &t_even, &t_odd);
          LoadFloatPairs(p + i, &p_even, &p_odd);
        }
        s.Step(t_even, p_even);
        s.Step(t_odd, p_odd);
      }
    }
    for (; i + kLanes <= n; i += kLanes) {
      Prefetch(t + i), Prefetch(p + i);
      s.Step(E::Load(t + i), E::Load(p + i));
    }
    if (i < n) s.Step(LoadPadded<E>(t + i, n - i, -INFINITY), LoadPadded<E>(p + i, n - i, -INFINITY));
    result = s.Reduce();
    return 0;
  });
  return result;
}

distill::KlPartial KlPartialD(const void* y_true, const void* y_pred, int64_t n, double temperature) {
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  distill::KlPartial s;
  for (int64_t i = 0; i < n; ++i) {
    const double a = temperature != 1.0 ? t[i] / temperature : t[i];
    const double b = temperature != 1.0 ? p[i] / temperature : p[i];
    if (a != a || b != b || a == INFINITY || b == INFINITY) {
      s.nan = true;
      continue;
    }
    const bool masked_a = a == -INFINITY, masked_b = b == -INFINITY;
    if (masked_b && !masked_a) s.infinite = true;
    if (a > s.max_a) {
      const double scale = std::exp(s.max_a - a);
      s.sum_a *= scale, s.cross *= scale, s.max_a = a;
    }
    if (b > s.max_b) {
      s.sum_b *= std::exp(s.max_b - b), s.max_b = b;
    }
    const double ea = masked_a ? 0.0 : std::exp(a - s.max_a);
    s.sum_a += ea;
    s.sum_b += masked_b ? 0.0 : std::exp(b - s.max_b);
    if (!masked_a && !masked_b) s.cross += ea * (a - b);
  }
  return s;
}

// Narrow rows (cols <= kNarrowCols) go kLanes rows at a time, one row per lane: the rows are
// transposed into column vectors, so a row's maxima, exps and sums run across rows in SIMD with no
// per-row lane reduction or padding, and the rows' statistics are finished in SIMD too (KL, maxima
// and logs of kLanes / 2 rows per double vector). Each lane's arithmetic depends only on its own
// row, so a row's result never depends on the block it falls in. Rows past the end of a block are
// zeros, ignored.
constexpr int64_t kNarrowCols = 32;

// The lane permutes of one step of a kLanes x kLanes transposition: the step swaps bit s of the
// row index with bit s of the column index, for rows i and i + s (bit s of i clear):
// new row i = (row i, row i + s) at lanes j (bit s clear: row i's lane j; set: row i + s's j - s),
// new row i + s = lanes j (clear: row i's j + s; set: row i + s's j).
template <int... I>
constexpr Vi SwapLow(int s, std::integer_sequence<int, I...>) {
  return Vi{((I & s) ? kLanes + I - s : I)...};
}
template <int... I>
constexpr Vi SwapHigh(int s, std::integer_sequence<int, I...>) {
  return Vi{((I & s) ? kLanes + I : I + s)...};
}

// m[i][j] -> m[j][i]: log2(kLanes) steps of kLanes two-vector permutes.
template <int S = 1>
TF_KLD_INLINE void Transpose(Vf* m) {
  constexpr Vi kLow = SwapLow(S, std::make_integer_sequence<int, kLanes>());
  constexpr Vi kHigh = SwapHigh(S, std::make_integer_sequence<int, kLanes>());
  for (int i = 0; i < kLanes; ++i) {
    if (i & S) continue;
    const Vf a = m[i], b = m[i + S];
    m[i] = __builtin_shuffle(a, b, kLow);
    m[i + S] = __builtin_shuffle(a, b, kHigh);
  }
  if constexpr (2 * S < kLanes) Transpose<2 * S>(m);
}

// column[j] lane i = x[i * cols + j] widened, for rows i < rows (<= kLanes) and j < cols; lanes of
// later rows 0. x[0, readable) may be read (readable >= rows * cols): loads past a row's end land
// in columns that are dropped.
template <typename E>
TF_KLD_INLINE void LoadColumns(const typename E::Storage* x, int64_t rows, int64_t cols,
                               int64_t readable, Vf* column) {
  for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
    Vf m[kLanes];
    if (rows == kLanes && (kLanes - 1) * cols + c0 + kLanes <= readable) {  // a full block
      for (int i = 0; i < kLanes; ++i) m[i] = E::Load(x + i * cols + c0);
    } else {
      for (int64_t i = 0; i < kLanes; ++i) {
        const int64_t at = i * cols + c0;
        m[i] = i >= rows ? Splat(0.0f)
               : at + kLanes <= readable ? E::Load(x + at)
                                         : LoadPadded<E>(x + at, readable - at, 0.0f);
      }
    }
    Transpose(m);
    for (int64_t j = c0; j < cols && j < c0 + kLanes; ++j) column[j] = m[j - c0];
  }
}

TF_KLD_INLINE Vd SplatD(double x) { return Vd{} + x; }

// Lane i of the kLanes doubles held as Accumulate's split (lanes [0, kLanes / 2) in lo).
TF_KLD_INLINE double Lane(Vd lo, Vd hi, int64_t i) { return i < kLanes / 2 ? lo[i] : hi[i - kLanes / 2]; }

// a * b + c for doubles, fused where the build has FMA.
TF_KLD_INLINE Vd MaddD(Vd a, Vd b, Vd c) {
#if defined(__AVX512F__)
  return BitCast<Vd>(_mm512_fmadd_pd(BitCast<__m512d>(a), BitCast<__m512d>(b), BitCast<__m512d>(c)));
#elif defined(__FMA__)
  return BitCast<Vd>(_mm256_fmadd_pd(BitCast<__m256d>(a), BitCast<__m256d>(b), BitCast<__m256d>(c)));
#else
  return a * b + c;
#endif
}

// log x for lanes of positive normal x, within one double ulp: x = 2^e (1 + f), 1 + f in
// [sqrt(1/2), sqrt(2)) (f exact), and as fdlibm's log, log(1 + f) = f - (hfsq - s (hfsq + R)) with
// hfsq = f^2 / 2, s = f / (2 + f), R = 2 atanh(s) / s - 2 = 2/3 s^2 + 2/5 s^4 + ... (|s| <= 0.172,
// the series to s^20: truncation below 2^-56 relative); ln 2 in two parts (e ln2_hi exact). Every
// other lane (0, subnormal, inf, NaN, negative) takes libm's log.
TF_KLD_INLINE Vd LogD(Vd x) {
  typedef int64_t Vl __attribute__((vector_size(sizeof(Vd))));
  const Vl bits = BitCast<Vl>(x);
  // The exponent field as a double without an int64 conversion: 2^52 + field, minus 2^52 + 1023.
  Vd e = BitCast<Vd>((bits >> 52) | 0x4330000000000000LL) - SplatD(4503599627371519.0);
  Vd m = BitCast<Vd>((bits & 0x000FFFFFFFFFFFFFLL) | 0x3FF0000000000000LL);  // [1, 2)
  const Vl high = m > SplatD(1.4142135623730951);
  m = high ? m * 0.5 : m;
  e = high ? e + 1.0 : e;
  const Vd f = m - 1.0, s = f / (f + 2.0), z = s * s, z2 = z * z, z4 = z2 * z2;
  // R / z = 2/3 + 2/5 z + 2/7 z^2 + ... + 2/21 z^9 by Estrin's scheme (short dependency chains).
  auto pair = [&](double c0, double c1) { return MaddD(SplatD(c1), z, SplatD(c0)); };
  const Vd p03 = MaddD(pair(2.0 / 7, 2.0 / 9), z2, pair(2.0 / 3, 2.0 / 5));
  const Vd p47 = MaddD(pair(2.0 / 15, 2.0 / 17), z2, pair(2.0 / 11, 2.0 / 13));
  const Vd r = z * MaddD(pair(2.0 / 19, 2.0 / 21), z4 * z4, MaddD(p47, z4, p03));
  const Vd hfsq = 0.5 * f * f;
  Vd log = MaddD(e, SplatD(6.93147180369123816490e-01),
                 -((hfsq - MaddD(s, hfsq + r, e * 1.90821492927058770002e-10)) - f));
  const Vl special = ~((x >= SplatD(2.2250738585072014e-308)) & (x <= SplatD(1.7976931348623157e308)));
  if (__builtin_expect(AnyLane(BitCast<Vi>(special)), 0)) {
    for (int i = 0; i < kLanes / 2; ++i) {
      if (special[i]) log[i] = LibmLog(x[i]);
    }
  }
  return log;
}

// distill::Finish for kLanes / 2 rows: their maxima of raw logits (max_a, max_b), sums, the lanes'
// cross term (before CrossOfLogits), `infinite` nonzero for rows with a class of p > 0, q = 0;
// out[k][i] = stat k of lane i.
TF_KLD_INLINE void FinishLanes(Vd max_a, Vd max_b, Vd sum_a, Vd lane_cross, Vd sum_b, Vd infinite,
                               double temperature, double unit, double (*out)[kLanes / 2]) {
  const Vd ma = max_a / temperature, mb = max_b / temperature;  // MaxStat
  const Vd maxima = ma - mb;
  Vd cross = lane_cross * unit;
  cross = maxima - maxima == 0.0 ? cross + maxima * sum_a : cross;  // CrossOfLogits
  const Vd log_a = LogD(sum_a), log_b = LogD(sum_b);
  Vd kl = cross / sum_a - maxima - (log_a - log_b);
  const Vd minus_inf = SplatD(-INFINITY);
  kl = infinite != 0.0 ? SplatD(INFINITY) : kl;
  kl = (ma == minus_inf) | (mb == minus_inf) | (sum_a != sum_a) | (sum_b != sum_b) | (cross != cross)
           ? SplatD(NAN) : kl;
  std::memcpy(out[0], &ma, sizeof(Vd)), std::memcpy(out[1], &log_a, sizeof(Vd));
  std::memcpy(out[2], &mb, sizeof(Vd)), std::memcpy(out[3], &log_b, sizeof(Vd));
  std::memcpy(out[4], &kl, sizeof(Vd));
}

// f(r0, n, a, b) for each block of kLanes rows [r0, r0 + n) of narrow rows: a, b their columns.
template <typename E, typename F>
TF_KLD_INLINE void NarrowBlocks(const void* y_true, const void* y_pred, int64_t rows, int64_t cols,
                                F f) {
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t n = rows - r0 < kLanes ? rows - r0 : kLanes;
    Vf a[kNarrowCols], b[kNarrowCols];
    // Loads may run into the next block's rows (their lanes are dropped), not past the last row.
    LoadColumns<E>(t + r0 * cols, n, cols, (rows - r0) * cols, a);
    LoadColumns<E>(p + r0 * cols, n, cols, (rows - r0) * cols, b);
    f(r0, n, a, b);
  }
}

template <typename E>
void KlRowsNarrowF(const void* y_true, const void* y_pred, int64_t rows, int64_t cols,
                   float temperature, double* stats) {
  ForwardLoop(temperature, [&](auto mode) {
    constexpr int kMode = decltype(mode)::kMode;
    const KlLanes<kMode> empty(temperature);
    NarrowBlocks<E>(y_true, y_pred, rows, cols, [&](int64_t r0, int64_t n, const Vf* a, const Vf* b) {
      Vf max_a = Splat(-INFINITY), max_b = Splat(-INFINITY);
      for (int64_t j = 0; j < cols; ++j) {
        max_a = a[j] > max_a ? a[j] : max_a;  // NaN never raises a maximum: it makes the sums NaN
        max_b = b[j] > max_b ? b[j] : max_b;
      }
      KlLanes<kMode> s = empty;  // at the rows' final maxima: its steps never raise them
      s.max_a = max_a, s.max_b = max_b;
      for (int64_t j = 0; j < cols; ++j) s.Step(a[j], b[j]);
      s.Flush();
      // The rows' maxima and cross term as KlLanes::Reduce's, then distill::Finish, in SIMD.
      Vd max_a0, max_a1, max_b0, max_b1, inf0, inf1;
      Widen(max_a, &max_a0, &max_a1), Widen(max_b, &max_b0, &max_b1);
      Widen(s.InfiniteLanes(), &inf0, &inf1);
      alignas(64) double lanes[2][distill::kStats][kLanes / 2];
      FinishLanes(max_a0, max_b0, s.sum_a0, s.cross0, s.sum_b0, inf0, temperature, s.arg.unit, lanes[0]);
      FinishLanes(max_a1, max_b1, s.sum_a1, s.cross1, s.sum_b1, inf1, temperature, s.arg.unit, lanes[1]);
      for (int64_t i = 0; i < n; ++i) {
        double* row = stats + (r0 + i) * distill::kStats;
        for (int k = 0; k < distill::kStats; ++k) row[k] = lanes[i / (kLanes / 2)][k][i % (kLanes / 2)];
      }
    });
    return 0;
  });
}

// The gradients of kLanes elements of one row: d_pred = g/T (q - p), d_true = g/T p ((lp - lq) - KL)
// (0 where p = 0 exactly: a masked teacher class), lp = (a - max_a) / T - log sum_a from the raw
// logits and maxima (the distances the forward summed).
struct KlRowGrad {
  Vf max_a, log_a, max_b, log_b, kl, g_over_t;
  Divider by_t;

  explicit KlRowGrad(float t) : by_t(t) {}  // lanes set by the caller

  KlRowGrad(const double* stats, float g, float t)
      : max_a(Splat(RawMax(stats[0], t))), log_a(Splat(static_cast<float>(stats[1]))),
        max_b(Splat(RawMax(stats[2], t))), log_b(Splat(static_cast<float>(stats[3]))),
        kl(Splat(static_cast<float>(stats[4]))), g_over_t(Splat(g / t)), by_t(t) {}

  TF_KLD_INLINE void Compute(Vf a, Vf b, Vf* d_true, Vf* d_pred) const {
    Compute<Divider::kDivide + 1, true>(a, b, d_true, d_pred);
  }
  // kMode: the Divider's mode, fixed (kDivide + 1: the runtime one); kTrue: d_true wanted (else
  // left unset, none of its arithmetic done).
  template <int kMode, bool kTrue>
  TF_KLD_INLINE void Compute(Vf a, Vf b, Vf* d_true, Vf* d_pred) const {
    auto over_t = [&](Vf x) { return kMode > Divider::kDivide ? by_t(x) : by_t.Apply<kMode>(x); };
    const Vf lp = over_t(a - max_a) - log_a, lq = over_t(b - max_b) - log_b;
    const Vf p = ExpNonPositive(lp), q = ExpNonPositive(lq);
    *d_pred = g_over_t * (q - p);
    if (kTrue) *d_true = a == Splat(-INFINITY) ? Splat(0.0f) : g_over_t * (p * ((lp - lq) - kl));
  }
};

// v's lanes rearranged: lane l of the result is lane idx[l] of v (0 <= idx[l] < kLanes).
TF_KLD_INLINE Vf PermuteLanes(Vf v, Vi idx) {
#if defined(__AVX512F__)
  return BitCast<Vf>(_mm512_permutexvar_ps(BitCast<__m512i>(idx), BitCast<__m512>(v)));
#elif defined(__AVX2__)
  return BitCast<Vf>(_mm256_permutevar8x32_ps(BitCast<__m256>(v), BitCast<__m256i>(idx)));
#else
  Vf r;
  for (int l = 0; l < kLanes; ++l) r[l] = v[idx[l]];
  return r;
#endif
}

// Whole narrow rows [row_begin, row_end), kLanes rows a block: the block's rows' statistics go one
// row per lane, and its elements are read, computed and written kLanes contiguous ones at a time,
// each vector's lanes given their rows' statistics by one lane permute per statistic (no
// transposition of the elements). Each element gets exactly the arithmetic of the row-by-row path,
// and each vector is read before its gradient is written (an output may share its input's buffer).
template <typename E>
void KlGradientNarrowF(const typename E::Storage* g, const typename E::Storage* t,
                       const typename E::Storage* p, const double* stats, typename E::Storage* dt,
                       typename E::Storage* dp, int64_t row_begin, int64_t row_end, int64_t cols,
                       float temperature) {
  Vi row_of[kNarrowCols];  // lane l of a block's vector v: element kLanes v + l, row (kLanes v + l) / cols
  for (int64_t v = 0; v < cols; ++v) {
    for (int l = 0; l < kLanes; ++l) row_of[v][l] = static_cast<int32_t>((kLanes * v + l) / cols);
  }
  KlRowGrad rows(temperature);
  rows.by_t.Dispatch([&](auto mode) {
    constexpr int kMode = decltype(mode)::kMode;
    auto blocks = [&](auto want_true) {
      constexpr bool kTrue = decltype(want_true)::value;
      for (int64_t r0 = row_begin; r0 < row_end; r0 += kLanes) {
        const int64_t n = row_end - r0 < kLanes ? row_end - r0 : kLanes;
        rows.max_a = rows.log_a = rows.max_b = rows.log_b = rows.kl = rows.g_over_t = Splat(0.0f);
        for (int64_t i = 0; i < n; ++i) {
          const double* s = stats + (r0 + i) * distill::kStats;
          rows.max_a[i] = RawMax(s[0], temperature), rows.log_a[i] = static_cast<float>(s[1]);
          rows.max_b[i] = RawMax(s[2], temperature), rows.log_b[i] = static_cast<float>(s[3]);
          rows.kl[i] = static_cast<float>(s[4]), rows.g_over_t[i] = E::ToFloat(g[r0 + i]) / temperature;
        }
        const int64_t base = r0 * cols, count = n * cols;
        KlRowGrad rg = rows;
        for (int64_t v = 0; v * kLanes < count; ++v) {
          const Vi idx = row_of[v];
          rg.max_a = PermuteLanes(rows.max_a, idx), rg.log_a = PermuteLanes(rows.log_a, idx);
          rg.max_b = PermuteLanes(rows.max_b, idx), rg.log_b = PermuteLanes(rows.log_b, idx);
          if (kTrue) rg.kl = PermuteLanes(rows.kl, idx);
          rg.g_over_t = PermuteLanes(rows.g_over_t, idx);
          const int64_t i = base + v * kLanes, left = count - v * kLanes;
          Vf vt, vp;
          if (left >= kLanes) {
            rg.Compute<kMode, kTrue>(E::Load(t + i), E::Load(p + i), &vt, &vp);
            if (kTrue) E::Store(dt + i, vt);
            if (dp != nullptr) E::Store(dp + i, vp);
          } else {  // the last rows' last elements (rows past the block's end are zeros, unused)
            rg.Compute<kMode, kTrue>(LoadPadded<E>(t + i, left, 0.0f), LoadPadded<E>(p + i, left, 0.0f),
                                     &vt, &vp);
            for (int64_t j = 0; j < left; ++j) {
              if (kTrue) dt[i + j] = E::FromFloat(vt[j]);
              if (dp != nullptr) dp[i + j] = E::FromFloat(vp[j]);
            }
          }
        }
      }
      return 0;
    };
    return dt == nullptr ? blocks(std::false_type()) : blocks(std::true_type());
  });
}

template <typename E>
void KlGradientF(const void* grad, const void* y_true, const void* y_pred, const double* stats,
                 void* d_true, void* d_pred, int64_t begin, int64_t end, int64_t cols,
                 float temperature) {
  using S = typename E::Storage;
  const auto* g = static_cast<const S*>(grad);
  const auto* t = static_cast<const S*>(y_true);
  const auto* p = static_cast<const S*>(y_pred);
  auto* dt = static_cast<S*>(d_true);
  auto* dp = static_cast<S*>(d_pred);
  if (dt == nullptr && dp == nullptr) return;
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    if (cols <= kNarrowCols && i == row * cols && stop - i == cols) {  // whole narrow rows
      const int64_t rows = (end - i) / cols;
      KlGradientNarrowF<E>(g, t, p, stats, dt, dp, row, row + rows, cols, temperature);
      row += rows - 1, i += rows * cols;
      continue;
    }
    const KlRowGrad rg(stats + row * distill::kStats, E::ToFloat(g[row]), temperature);
    Vf vt, vp;
    // The loop built for the temperature's mode and for the outputs wanted (distillation wants
    // d_pred alone: none of d_true's arithmetic).
    // bfloat16 goes 2 x kLanes at a time as even- and odd-indexed vectors (no lane shuffles either
    // way; each element's arithmetic is the same in any lane).
    auto loop = [&](auto mode, auto want_true) {
      constexpr int kMode = decltype(mode)::kMode;
      constexpr bool kTrue = decltype(want_true)::value;
      if constexpr (std::is_same<E, Bfloat16T>::value) {
        for (; i + 2 * kLanes <= stop; i += 2 * kLanes) {
          Prefetch(t + i), Prefetch(p + i);
          Vf t_even, t_odd, p_even, p_odd, vt_odd, vp_odd;
          Bfloat16T::LoadPairs(t + i, &t_even, &t_odd);
          Bfloat16T::LoadPairs(p + i, &p_even, &p_odd);
          rg.Compute<kMode, kTrue>(t_even, p_even, &vt, &vp);
          rg.Compute<kMode, kTrue>(t_odd, p_odd, &vt_odd, &vp_odd);
          if (kTrue) Bfloat16T::StorePairs(dt + i, vt, vt_odd);
          if (dp != nullptr) Bfloat16T::StorePairs(dp + i, vp, vp_odd);
        }
      }
      for (; i + kLanes <= stop; i += kLanes) {
        Prefetch(t + i), Prefetch(p + i);
        rg.Compute<kMode, kTrue>(E::Load(t + i), E::Load(p + i), &vt, &vp);
        if (kTrue) E::Store(dt + i, vt);
        if (dp != nullptr) E::Store(dp + i, vp);
      }
      return 0;
    };
    rg.by_t.Dispatch([&](auto mode) {
      return dt == nullptr ? loop(mode, std::false_type()) : loop(mode, std::true_type());
    });
    if (i < stop) {  // each element's value depends only on itself and its row: padding is free
      const int64_t n = stop - i;
      rg.Compute(LoadPadded<E>(t + i, n, 0.0f), LoadPadded<E>(p + i, n, 0.0f), &vt, &vp);
      for (int64_t j = 0; j < n; ++j) {
        if (dt != nullptr) dt[i + j] = E::FromFloat(vt[j]);
        if (dp != nullptr) dp[i + j] = E::FromFloat(vp[j]);
      }
      i = stop;
    }
  }
}

void KlGradientD(const void* grad, const void* y_true, const void* y_pred, const double* stats,
                 void* d_true, void* d_pred, int64_t begin, int64_t end, int64_t cols,
                 double temperature) {
  const auto* g = static_cast<const double*>(grad);
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  auto* dt = static_cast<double*>(d_true);
  auto* dp = static_cast<double*>(d_pred);
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const double* s = stats + row * distill::kStats;
    const double gt = g[row] / temperature;
    for (; i < stop; ++i) {
      const double a = temperature != 1.0 ? t[i] / temperature : t[i];
      const double b = temperature != 1.0 ? p[i] / temperature : p[i];
      const double lp = (a - s[0]) - s[1], lq = (b - s[2]) - s[3];
      const double pe = std::exp(lp), qe = std::exp(lq);
      if (dp != nullptr) dp[i] = gt * (qe - pe);
      if (dt != nullptr) dt[i] = a == -INFINITY ? 0.0 : gt * (pe * ((lp - lq) - s[4]));
    }
  }
}

// log1p(s) given u, 1 + s computed otherwise (within an ulp or two: a sum of positive terms): log(u)
// plus, where u is in [1/2, 2], the correction (s - (u - 1)) / u, u - 1 exact there; 1 / u as 2 - u,
// whose error (u - 1)^2 / u times the correction, itself some ulps of 1, stays below an ulp of
// log1p(s) over that interval. s where u rounds to 1. u: a positive normal float or NaN.
TF_KLD_INLINE Vf Log1pOf(Vf u, Vf s) {
  const Vf one = Splat(1.0f);
  const Vf c = (u >= Splat(0.5f)) & (u <= Splat(2.0f)) ? s - (u - one) : Splat(0.0f);
  return Madd(c, Splat(2.0f) - u, Log<true>(u));
}

// log1p of kLanes floats in [0, 1].
TF_KLD_INLINE Vf Log1pUnit(Vf s) { return Log1pOf(s + Splat(1.0f), s); }

// expm1(x) for x in [-1/2, 0]: its Taylor series to x^8 (the rest below 2^-27 of |expm1(x)|).
TF_KLD_INLINE Vf Expm1Small(Vf x) {
  Vf y = Madd(Splat(1.0f / 40320), x, Splat(1.0f / 5040));
  y = Madd(y, x, Splat(1.0f / 720));
  y = Madd(y, x, Splat(1.0f / 120));
  y = Madd(y, x, Splat(1.0f / 24));
  y = Madd(y, x, Splat(1.0f / 6));
  y = Madd(y, x, Splat(0.5f));
  return Madd(y * x, x, x);
}

// One element group's p = exp(lp), q = exp(lq) (the larger as exp of its log, the other as it
// times e^-|d|) and log-ratios to the mixture m = beta p + (1 - beta) q, rp = lp - lm and
// rq = lq - lm, and the second pass's terms: distill_jsd.h's steps (d = lq - lp from the logits'
// difference, one log-ratio computed and the other as it plus or minus d, the JSD's terms), with
// the vectorised exp, log and expm1 below. expm1(-|d|) is the series below |d| = 1/2 and e^-|d| - 1
// above; e^z, z = d for rp and -d for rq, is e^-|d| or, only where d lies between 0 and theta
// (never at beta = 1/2), its reciprocal. Beta below kRatioMinBeta (its float not normal, nor u): lm
// = log(beta p + (1 - beta) q) as ByMixture takes it.
struct JsdLogs {
  Vf max_a, log_a, max_b, log_b, max_ba, max_ba_lo, log_ba, log_ba_lo, log_beta, log1m_beta, beta,
      one_minus_beta, theta;
  Divider by_t;
  bool tiny_beta, divides;

  JsdLogs(const double* stats, const distill::JsdParams& params)
      : max_a(Splat(RawMax(stats[0], static_cast<float>(params.temperature)))),
        log_a(Splat(static_cast<float>(stats[1]))),
        max_b(Splat(RawMax(stats[2], static_cast<float>(params.temperature)))),
        log_b(Splat(static_cast<float>(stats[3]))),
        log_beta(Splat(static_cast<float>(params.log_beta))),
        log1m_beta(Splat(static_cast<float>(params.log1m_beta))),
        beta(Splat(static_cast<float>(params.beta))),
        one_minus_beta(Splat(static_cast<float>(1.0 - params.beta))),
        theta(Splat(static_cast<float>(params.ratio_threshold))),
        by_t(static_cast<float>(params.temperature)),
        tiny_beta(!(params.beta >= distill::kRatioMinBeta)),
        divides(static_cast<float>(params.ratio_threshold) != 0.0f) {
    const distill::RowShift<float> shift = distill::RowShiftOf(max_a[0], max_b[0], stats[3] - stats[1]);
    max_ba = Splat(shift.mh), max_ba_lo = Splat(shift.ml), log_ba = Splat(shift.log_hi);
    log_ba_lo = Splat(shift.log_lo);
  }

  // Lane i's row constants for d (the narrow rows' one row per lane).
  TF_KLD_INLINE void SetShiftLane(int64_t i, double log_ba_i) {
    const distill::RowShift<float> shift = distill::RowShiftOf(max_a[i], max_b[i], log_ba_i);
    max_ba[i] = shift.mh, max_ba_lo[i] = shift.ml, log_ba[i] = shift.log_hi, log_ba_lo[i] = shift.log_lo;
  }

  TF_KLD_INLINE void Compute(Vf a, Vf b, Vf* p, Vf* q, Vf* rp, Vf* rq, Vi* masked_a, Vi* masked_b,
                             Vf* distance = nullptr) const {
    const Vf minus_inf = Splat(-INFINITY), one = Splat(1.0f), zero = Splat(0.0f);
    *masked_a = a == minus_inf, *masked_b = b == minus_inf;
    const Vf lp = by_t(a - max_a) - log_a, lq = by_t(b - max_b) - log_b;  // as KlRowGrad's
    const Vf d = *masked_a | *masked_b ? lq - lp                  // lq - lp, to ulps of itself
                                       : (by_t(distill::LogitDistance(a, b, max_ba, max_ba_lo)) - log_ba) - log_ba_lo;
    if (distance != nullptr) *distance = d;
    const Vf ad = BitCast<Vf>(BitCast<Vi>(d) & 0x7fffffff);
    const Vi up = d > zero;                                      // q > p
    const Vf e = ExpNonPositive(-ad);                            // e^-|d|
    const Vf k = ad < Splat(0.5f) ? Expm1Small(-ad) : e - one;   // expm1(-|d|)
    const Vf top = ExpNonPositive(up ? lq : lp);                 // the larger of p, q
    *p = up ? top * e : top, *q = up ? top : top * e;
    if (__builtin_expect(tiny_beta, 0)) return ByMixture(lp, lq, *p, *q, *masked_a & *masked_b, rp, rq);
    Vf ez = e, kz = k;                                           // e^z, expm1(z) where z = -|d|
    const Vi q_side = d >= theta;                                // rq computed, rp = rq - d
    if (divides) {
      const Vi rise = q_side != up;                              // z = |d| > 0
      if (AnyLane(rise)) {
        const Vf r = one / e;
        ez = rise ? r : e, kz = rise ? -(k * r) : k;
      }
    }
    const Vf x = q_side ? one_minus_beta : beta, y = q_side ? beta : one_minus_beta;
    const Vf r = -Log1pOf(Madd(y, ez, x), y * kz);
    *rp = q_side ? r - d : r, *rq = q_side ? r : r + d;
  }

  // lm = log(beta p + (1 - beta) q): its log where that sum is at least 2^-125, else by
  // log-sum-exp, lm = hi + log1p(exp(lo - hi)) over log beta + lp and log(1 - beta) + lq (never a
  // log of a sum of underflowing probabilities); -inf where p = q = 0.
  TF_KLD_INLINE void ByMixture(Vf lp, Vf lq, Vf p, Vf q, Vi both_masked, Vf* rp, Vf* rq) const {
    const Vf m = Madd(beta, p, one_minus_beta * q);
    Vf lm = Log<true>(m);  // every lane positive normal or NaN, but for the lanes below
    const Vi small = m < Splat(0x1p-125f);
    if (AnyLane(small)) {
      const Vf x1 = lp + log_beta, x2 = lq + log1m_beta;
      const Vi first = x1 >= x2;
      const Vf hi = first ? x1 : x2, lo = first ? x2 : x1;
      const Vf mixed = hi + Log1pUnit(ExpNonPositive(lo - hi));
      const Vf minus_inf = Splat(-INFINITY);
      lm = small ? (both_masked ? minus_inf : (lo == minus_inf ? hi : mixed)) : lm;
    }
    *rp = lp - lm, *rq = lq - lm;
  }

  // The loss's series (distill::Series<float>) splat: the second pass's, not the gradient's.
  struct Series {
    Vf scale, k[distill::kJsdSeriesFloat];
    explicit Series(const distill::JsdParams& params) {
      const distill::Series<float> s = distill::SeriesOf<float>(params.beta, params.series);
      scale = Splat(s.scale);
      for (int j = 0; j < distill::kJsdSeriesFloat; ++j) k[j] = Splat(s.k[j]);
    }
  };

  // The second pass's terms (distill_jsd.h's AddJsdTerms): p rp and q rq (0 for masked classes)
  // and the JSD's term (JsdTerm: its series in d where |d| <= kJsdSeriesBound).
  TF_KLD_INLINE void Terms(const Series& series, Vf a, Vf b, Vf* plain_p, Vf* plain_q, Vf* term) const {
    Vf pe, qe, rp, rq, d;
    Vi ma, mb;
    Compute(a, b, &pe, &qe, &rp, &rq, &ma, &mb, &d);
    const Vf zero = Splat(0.0f);
    *plain_p = ma ? zero : pe * rp, *plain_q = mb ? zero : qe * rq;
    Vf k = series.k[distill::kJsdSeriesFloat - 1];
    for (int j = distill::kJsdSeriesFloat - 2; j >= 0; --j) k = Madd(k, d, series.k[j]);
    const Vf near = pe * (series.scale * ((d * d) * k)), far = Madd(beta, *plain_p, one_minus_beta * *plain_q);
    const Vf ad = BitCast<Vf>(BitCast<Vi>(d) & 0x7fffffff);  // NaN where both are masked: far
    *term = ad <= Splat(static_cast<float>(distill::kJsdSeriesBound)) ? near : far;
  }
};

template <typename E>
void JsdSumsF(const void* y_true, const void* y_pred, int64_t n, const distill::JsdParams& params,
              const double* stats, double* sums) {
  const auto* t = static_cast<const typename E::Storage*>(y_true);
  const auto* p = static_cast<const typename E::Storage*>(y_pred);
  const JsdLogs logs(stats, params);
  const JsdLogs::Series series(params);
  const Vf zero = Splat(0.0f);
  Vf f[distill::kJsdSums] = {zero, zero, zero};
  Vd lo[distill::kJsdSums] = {}, hi[distill::kJsdSums] = {};
  int steps = 0;
  auto flush = [&]() __attribute__((always_inline)) {
    for (int k = 0; k < distill::kJsdSums; ++k) Accumulate(f[k], &lo[k], &hi[k]), f[k] = zero;
  };
  auto step = [&](Vf a, Vf b) __attribute__((always_inline)) {
    Vf v[distill::kJsdSums];
    logs.Terms(series, a, b, &v[0], &v[1], &v[2]);
    for (int k = 0; k < distill::kJsdSums; ++k) f[k] += v[k];
    if (++steps == kFlushSteps) flush(), steps = 0;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Prefetch(t + i), Prefetch(p + i);
    step(E::Load(t + i), E::Load(p + i));
  }
  if (i < n) step(LoadPadded<E>(t + i, n - i, -INFINITY), LoadPadded<E>(p + i, n - i, -INFINITY));
  flush();
  for (int k = 0; k < distill::kJsdSums; ++k) sums[k] += SumLanes(lo[k] + hi[k]);
}

// The second JSD pass of `rows` whole narrow rows (cols <= kNarrowCols), kLanes rows a block, one
// row per lane as in KlRowsNarrowF: JsdLogs' statistics per lane, the same steps over the rows'
// columns. stats: kJsdStats per row (the first four set); row r's kJsdSums sums to sums[kJsdSums r].
template <typename E>
void JsdSumsNarrowF(const void* y_true, const void* y_pred, int64_t rows, int64_t cols,
                    const distill::JsdParams& params, const double* stats, double* sums) {
  const float temperature = static_cast<float>(params.temperature);
  const double no_stats[4] = {0.0, 0.0, 0.0, 0.0};  // lanes past a block's rows: zeros, ignored
  JsdLogs logs(no_stats, params);
  const JsdLogs::Series series(params);
  NarrowBlocks<E>(y_true, y_pred, rows, cols, [&](int64_t r0, int64_t n, const Vf* a, const Vf* b) {
    logs.max_a = logs.log_a = logs.max_b = logs.log_b = Splat(0.0f);
    logs.max_ba = logs.max_ba_lo = logs.log_ba = logs.log_ba_lo = Splat(0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const double* st = stats + (r0 + i) * distill::kJsdStats;
      logs.max_a[i] = RawMax(st[0], temperature), logs.log_a[i] = static_cast<float>(st[1]);
      logs.max_b[i] = RawMax(st[2], temperature), logs.log_b[i] = static_cast<float>(st[3]);
      logs.SetShiftLane(i, st[3] - st[1]);
    }
    // Each term goes into double at once (a row's terms share a lane here, where JsdSumsF gives
    // them a lane each: no float sums of a row's terms, which would cost the small JSD ulps).
    Vd lo[distill::kJsdSums] = {}, hi[distill::kJsdSums] = {};
    for (int64_t j = 0; j < cols; ++j) {
      Vf v[distill::kJsdSums];
      logs.Terms(series, a[j], b[j], &v[0], &v[1], &v[2]);
      for (int k = 0; k < distill::kJsdSums; ++k) Accumulate(v[k], &lo[k], &hi[k]);
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < distill::kJsdSums; ++k) sums[distill::kJsdSums * (r0 + i) + k] = Lane(lo[k], hi[k], i);
    }
  });
}

// libm's exp, expm1, log and log1p: the float64 kernels' math for distill_jsd.h.
struct StdMath {
  static double Exp(double x) { return std::exp(x); }
  static double Expm1(double x) { return std::expm1(x); }
  static double Log(double x) { return std::log(x); }
  static double Log1p(double x) { return std::log1p(x); }
};

TF_KLD_INLINE distill::Mixture<double> MixtureD(const distill::JsdParams& params) {
  return distill::MixtureOf<double>(params.beta, params.log_beta, params.log1m_beta, params.ratio_threshold);
}

// The float64 rows' element: a, b divided by T, the row's stats and shift (RowShiftD); returns d.
TF_KLD_INLINE double JsdElementD(double a, double b, const double* st, const distill::RowShift<double>& shift,
                                 const distill::Mixture<double>& mix, double* p, double* q, double* rp,
                                 double* rq) {
  const double lp = (a - st[0]) - st[1], lq = (b - st[2]) - st[3];
  const double d = distill::LogDistance(a, b, lp, lq, shift, 1.0, false);
  distill::JsdElement<StdMath>(lp, lq, d, mix, p, q, rp, rq);
  return d;
}

TF_KLD_INLINE distill::RowShift<double> RowShiftD(const double* st) {
  return distill::RowShiftOf(st[0], st[2], st[3] - st[1]);
}

void JsdSumsD(const void* y_true, const void* y_pred, int64_t n, const distill::JsdParams& params,
              const double* stats, double* sums) {
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  const double temperature = params.temperature;
  const distill::Mixture<double> mix = MixtureD(params);
  const distill::RowShift<double> shift = RowShiftD(stats);
  const distill::Series<double> series = distill::SeriesOf<double>(params.beta, params.series);
  double s[distill::kJsdSums] = {};
  for (int64_t i = 0; i < n; ++i) {
    const double a = temperature != 1.0 ? t[i] / temperature : t[i];
    const double b = temperature != 1.0 ? p[i] / temperature : p[i];
    double pe, qe, rp, rq;
    const double d = JsdElementD(a, b, stats, shift, mix, &pe, &qe, &rp, &rq);
    distill::AddJsdTerms(a == -INFINITY, b == -INFINITY, pe, qe, rp, rq, d, mix, series, s);
  }
  for (int k = 0; k < distill::kJsdSums; ++k) sums[k] += s[k];
}

template <typename E>
void JsdGradientF(const void* grad, const void* y_true, const void* y_pred, const double* stats,
                  void* d_true, void* d_pred, int64_t begin, int64_t end, int64_t cols,
                  const distill::JsdParams& params) {
  using S = typename E::Storage;
  const auto* g = static_cast<const S*>(grad);
  const auto* t = static_cast<const S*>(y_true);
  const auto* p = static_cast<const S*>(y_pred);
  auto* dt = static_cast<S*>(d_true);
  auto* dp = static_cast<S*>(d_pred);
  const float temperature = static_cast<float>(params.temperature);
  const Vf zero = Splat(0.0f);
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const double* st = stats + row * distill::kJsdStats;
    const JsdLogs logs(st, params);
    const float gt = E::ToFloat(g[row]) / temperature;
    const Vf gp = Splat(gt * static_cast<float>(params.beta));
    const Vf gq = Splat(gt * static_cast<float>(1.0 - params.beta));
    const Vf kl_p = Splat(static_cast<float>(st[4])), kl_q = Splat(static_cast<float>(st[5]));
    auto compute = [&](Vf a, Vf b, Vf* vt, Vf* vp) {
      Vf pe, qe, rp, rq;
      Vi ma, mb;
      logs.Compute(a, b, &pe, &qe, &rp, &rq, &ma, &mb);
      *vt = ma ? zero : gp * (pe * (rp - kl_p));
      *vp = mb ? zero : gq * (qe * (rq - kl_q));
    };
    Vf vt, vp;
    for (; i + kLanes <= stop; i += kLanes) {
      Prefetch(t + i), Prefetch(p + i);
      compute(E::Load(t + i), E::Load(p + i), &vt, &vp);
      if (dt != nullptr) E::Store(dt + i, vt);
      if (dp != nullptr) E::Store(dp + i, vp);
    }
    if (i < stop) {
      const int64_t n = stop - i;
      compute(LoadPadded<E>(t + i, n, 0.0f), LoadPadded<E>(p + i, n, 0.0f), &vt, &vp);
      for (int64_t j = 0; j < n; ++j) {
        if (dt != nullptr) dt[i + j] = E::FromFloat(vt[j]);
        if (dp != nullptr) dp[i + j] = E::FromFloat(vp[j]);
      }
      i = stop;
    }
  }
}

void JsdGradientD(const void* grad, const void* y_true, const void* y_pred, const double* stats,
                  void* d_true, void* d_pred, int64_t begin, int64_t end, int64_t cols,
                  const distill::JsdParams& params) {
  const auto* g = static_cast<const double*>(grad);
  const auto* t = static_cast<const double*>(y_true);
  const auto* p = static_cast<const double*>(y_pred);
  auto* dt = static_cast<double*>(d_true);
  auto* dp = static_cast<double*>(d_pred);
  const double temperature = params.temperature;
  const distill::Mixture<double> mix = MixtureD(params);
  int64_t i = begin;
  for (int64_t row = begin / cols; i < end; ++row) {
    const int64_t stop = (row + 1) * cols < end ? (row + 1) * cols : end;
    const double* s = stats + row * distill::kJsdStats;
    const distill::RowShift<double> shift = RowShiftD(s);
    const double gt = g[row] / temperature;
    for (; i < stop; ++i) {
      const double a = temperature != 1.0 ? t[i] / temperature : t[i];
      const double b = temperature != 1.0 ? p[i] / temperature : p[i];
      double pe, qe, rp, rq;
      JsdElementD(a, b, s, shift, mix, &pe, &qe, &rp, &rq);
      if (dt != nullptr) dt[i] = a == -INFINITY ? 0.0 : gt * params.beta * (pe * (rp - s[4]));
      if (dp != nullptr) dp[i] = b == -INFINITY ? 0.0 : gt * (1.0 - params.beta) * (qe * (rq - s[5]));
    }
  }
}

void DistillJsdSums(Type type, const void* t, const void* p, int64_t n,
                    const distill::JsdParams& params, const double* stats, double* sums) {
  switch (type) {
    case Type::kHalf: return JsdSumsF<HalfT>(t, p, n, params, stats, sums);
    case Type::kBfloat16: return JsdSumsF<Bfloat16T>(t, p, n, params, stats, sums);
    case Type::kFloat: return JsdSumsF<FloatT>(t, p, n, params, stats, sums);
    case Type::kDouble: return JsdSumsD(t, p, n, params, stats, sums);
  }
}

void DistillJsdGradient(Type type, const void* g, const void* t, const void* p, const double* stats,
                        void* dt, void* dp, int64_t begin, int64_t end, int64_t cols,
                        const distill::JsdParams& params) {
  switch (type) {
    case Type::kHalf: return JsdGradientF<HalfT>(g, t, p, stats, dt, dp, begin, end, cols, params);
    case Type::kBfloat16:
      return JsdGradientF<Bfloat16T>(g, t, p, stats, dt, dp, begin, end, cols, params);
    case Type::kFloat: return JsdGradientF<FloatT>(g, t, p, stats, dt, dp, begin, end, cols, params);
    case Type::kDouble: return JsdGradientD(g, t, p, stats, dt, dp, begin, end, cols, params);
  }
}

distill::KlPartial DistillKlPartial(Type type, const void* t, const void* p, int64_t n,
                                    double temperature) {
  const float tf = static_cast<float>(temperature);
  switch (type) {
    case Type::kHalf: return KlPartialF<HalfT>(t, p, n, tf);
    case Type::kBfloat16: return KlPartialF<Bfloat16T>(t, p, n, tf);
    case Type::kFloat: return KlPartialF<FloatT>(t, p, n, tf);
    case Type::kDouble: return KlPartialD(t, p, n, temperature);
  }
  return {};
}

void DistillKlRowsNarrow(Type type, const void* t, const void* p, int64_t rows, int64_t cols,
                         double temperature, double* stats) {
  const float tf = static_cast<float>(temperature);
  switch (type) {
    case Type::kHalf: return KlRowsNarrowF<HalfT>(t, p, rows, cols, tf, stats);
    case Type::kBfloat16: return KlRowsNarrowF<Bfloat16T>(t, p, rows, cols, tf, stats);
    case Type::kFloat: return KlRowsNarrowF<FloatT>(t, p, rows, cols, tf, stats);
    case Type::kDouble:  // not supported (the op sends float64 rows one at a time): NaN
      for (int64_t i = 0; i < rows * distill::kStats; ++i) stats[i] = NAN;
      return;
  }
}

void DistillJsdSumsNarrow(Type type, const void* t, const void* p, int64_t rows, int64_t cols,
                          const distill::JsdParams& params, const double* stats, double* sums) {
  switch (type) {
    case Type::kHalf: return JsdSumsNarrowF<HalfT>(t, p, rows, cols, params, stats, sums);
    case Type::kBfloat16: return JsdSumsNarrowF<Bfloat16T>(t, p, rows, cols, params, stats, sums);
    case Type::kFloat: return JsdSumsNarrowF<FloatT>(t, p, rows, cols, params, stats, sums);
    case Type::kDouble:  // not supported (the op sends float64 rows one at a time): NaN
      for (int64_t i = 0; i < distill::kJsdSums * rows; ++i) sums[i] = NAN;
      return;
  }
}

void DistillKlGradient(Type type, const void* g, const void* t, const void* p, const double* stats,
                       void* dt, void* dp, int64_t begin, int64_t end, int64_t cols,
                       double temperature) {
  const float tf = static_cast<float>(temperature);
  switch (type) {
    case Type::kHalf: return KlGradientF<HalfT>(g, t, p, stats, dt, dp, begin, end, cols, tf);
    case Type::kBfloat16: return KlGradientF<Bfloat16T>(g, t, p, stats, dt, dp, begin, end, cols, tf);
    case Type::kFloat: return KlGradientF<FloatT>(g, t, p, stats, dt, dp, begin, end, cols, tf);
    case Type::kDouble: return KlGradientD(g, t, p, stats, dt, dp, begin, end, cols, temperature);
  }
}

template <bool kNonPositive>
void DistillExp(const float* x, float* out, int64_t n) {
  auto exp = [](Vf v) { return kNonPositive ? ExpNonPositive(v) : ExpF(v); };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) FloatT::Store(out + i, exp(FloatT::Load(x + i)));
  if (i < n) {
    const Vf e = exp(LoadPadded<FloatT>(x + i, n - i, 0.0f));
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = e[j];
  }
}

void DistillLog(const double* x, double* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes / 2 <= n; i += kLanes / 2) {
    Vd v;
    std::memcpy(&v, x + i, sizeof(v));
    v = LogD(v);
    std::memcpy(out + i, &v, sizeof(v));
  }
  if (i < n) {
    Vd v = SplatD(1.0);
    for (int64_t j = 0; i + j < n; ++j) v[j] = x[i + j];
    v = LogD(v);
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = v[j];
  }
}

void DistillExpDouble(const double* x, double* out, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes / 2) {
    Vd v = Vd{};
    for (int64_t j = 0; j < kLanes / 2 && i + j < n; ++j) v[j] = x[i + j];
    v = ExpNonPositiveD(v);
    for (int64_t j = 0; j < kLanes / 2 && i + j < n; ++j) out[i + j] = v[j];
  }
}

// ---------------------------------------------------------------------------------------------
// The chunked linear loss's gradients (see Kernels::linear_grads): acc += a^T b in place, and
// d_a += b w^T. Per panel of kRankPanel columns, b's rows are copied kRankDepth at a time into a
// contiguous block (in cache, no TLB misses from rows n floats apart); a tile of kRows x kVecs
// vectors of acc stays in registers while j runs over the block; then the block meets w's panel.

constexpr int64_t kRankDepth = 64;

template <int kRows, int kVecs>
TF_KLD_INLINE void RankTile(const float* a, const float* block, float* acc, int64_t depth,
                            int64_t m, int64_t n, int64_t i, int64_t c, int64_t block_c) {
  Vf tile[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) tile[r][v] = FloatT::Load(acc + (i + r) * n + c + v * kLanes);
  }
  for (int64_t j = 0; j < depth; ++j) {
    Vf bv[kVecs];
    const float* bj = block + j * distill::kRankPanel + block_c;
    for (int v = 0; v < kVecs; ++v) bv[v] = FloatT::Load(bj + v * kLanes);
    const float* aj = a + j * m + i;
    for (int r = 0; r < kRows; ++r) {
      const Vf s = Splat(aj[r]);
      for (int v = 0; v < kVecs; ++v) tile[r][v] = Madd(s, bv[v], tile[r][v]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) FloatT::Store(acc + (i + r) * n + c + v * kLanes, tile[r][v]);
  }
}

TF_KLD_INLINE float MaddF(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);  // as Madd's lanes
#else
  return a * b + c;
#endif
}

TF_KLD_INLINE float SumLanesF(Vf v) {  // in lane order
  float s = v[0];
  for (int i = 1; i < kLanes; ++i) s += v[i];
  return s;
}

// sums[j][i] += lanes of block[j][c] * w_panel[i * n + c] over the panel's width columns, for a
// tile of kJ rows of the block and kI rows of w (the last width % kLanes columns zero-padded).
template <typename E, int kJ, int kI>
TF_KLD_INLINE void ProjectTile(const float* block, const typename E::Storage* w_panel, Vf* sums,
                               int64_t width, int64_t m, int64_t n, int64_t j, int64_t i) {
  Vf t[kJ][kI];
  for (int r = 0; r < kJ; ++r) {
    for (int s = 0; s < kI; ++s) t[r][s] = sums[(j + r) * m + i + s];
  }
  const int64_t vec_width = width / kLanes * kLanes;
  for (int64_t c = 0; c < width; c += kLanes) {
    Vf wv[kI], bv[kJ];
    if (c < vec_width) {
      for (int s = 0; s < kI; ++s) wv[s] = E::Load(w_panel + (i + s) * n + c);
      for (int r = 0; r < kJ; ++r) bv[r] = FloatT::Load(block + (j + r) * distill::kRankPanel + c);
    } else {
      for (int s = 0; s < kI; ++s) wv[s] = LoadPadded<E>(w_panel + (i + s) * n + c, width - c, 0.0f);
      for (int r = 0; r < kJ; ++r) {
        bv[r] = LoadPadded<FloatT>(block + (j + r) * distill::kRankPanel + c, width - c, 0.0f);
      }
    }
    for (int r = 0; r < kJ; ++r) {
      for (int s = 0; s < kI; ++s) t[r][s] = Madd(bv[r], wv[s], t[r][s]);
    }
  }
  for (int r = 0; r < kJ; ++r) {
    for (int s = 0; s < kI; ++s) sums[(j + r) * m + i + s] = t[r][s];
  }
}

// sums[j][i] (lanes) for the block's depth rows j and all m rows i of w.
template <typename E>
void ProjectBlock(const float* block, const typename E::Storage* w_panel, Vf* sums, int64_t depth,
                  int64_t width, int64_t m, int64_t n) {
  constexpr int kT = 4;
  int64_t j = 0;
  for (; j + kT <= depth; j += kT) {
    int64_t i = 0;
    for (; i + kT <= m; i += kT) ProjectTile<E, kT, kT>(block, w_panel, sums, width, m, n, j, i);
    for (; i < m; ++i) ProjectTile<E, kT, 1>(block, w_panel, sums, width, m, n, j, i);
  }
  for (; j < depth; ++j) {
    for (int64_t i = 0; i < m; ++i) ProjectTile<E, 1, 1>(block, w_panel, sums, width, m, n, j, i);
  }
}

void ProjectBlockOf(Type type, const float* block, const void* w, int64_t offset, Vf* sums,
                    int64_t depth, int64_t width, int64_t m, int64_t n) {
  switch (type) {
    case Type::kHalf:
      return ProjectBlock<HalfT>(block, static_cast<const uint16_t*>(w) + offset, sums, depth, width, m, n);
    case Type::kBfloat16:
      return ProjectBlock<Bfloat16T>(block, static_cast<const uint16_t*>(w) + offset, sums, depth, width, m, n);
    case Type::kFloat:
    case Type::kDouble:  // float64 never comes here (the op's double path is scalar)
      return ProjectBlock<FloatT>(block, static_cast<const float*>(w) + offset, sums, depth, width, m, n);
  }
}

// The rows of the next block to copy, fetched into L2 a few lines per tile while this block is
// multiplied: the copy of rows n elements apart (runs of one panel, too short for the hardware's
// prefetchers) then overlaps the arithmetic instead of waiting on memory.
struct BlockPrefetch {
  BlockPrefetch(const void* first_row, int64_t row_stride_bytes, int64_t rows, int64_t row_bytes)
      : base(static_cast<const char*>(first_row)), stride(row_stride_bytes),
        lines_per_row((row_bytes + 63) / 64 + 1), total(rows * lines_per_row) {}
  void Issue(int64_t count) {
    for (; count > 0 && next < total; --count, ++next) {
      __builtin_prefetch(base + (next / lines_per_row) * stride + (next % lines_per_row) * 64, 0, 2);
    }
  }
  const char* base;
  int64_t stride, lines_per_row, total, next = 0;
};

// The next block after rows [j0, j0 + depth) of panel p: the panel's next rows, else the next
// panel's first; {-1, -1} after the last.
struct NextBlock {
  NextBlock(int64_t j0, int64_t depth, int64_t k, int64_t p, int64_t col_end) {
    if (j0 + depth < k) {
      row = j0 + depth, col = p;
    } else if (p + distill::kRankPanel < col_end) {
      row = 0, col = p + distill::kRankPanel;
    }
    if (row >= 0) {
      rows = k - row < kRankDepth ? k - row : kRankDepth;
      width = col + distill::kRankPanel < col_end ? distill::kRankPanel : col_end - col;
    }
  }
  int64_t row = -1, col = -1, rows = 0, width = 0;
};

template <int kRows>
struct TileRows {
  static constexpr int value = kRows;
};

// acc[i][p + c] += sum_j a[j][i] * block[j][c] for i < m, j < depth and the panel's width columns
// c: tiles of kRows x kVecs vectors, the last width % (kVecs * kLanes) columns one at a time;
// between tiles, prefetch's lines (nullptr: none).
void RankBlock(const float* a, const float* block, float* acc, int64_t depth, int64_t m, int64_t n,
               int64_t p, int64_t width, BlockPrefetch* prefetch) {
  // AVX-512 (32 registers): tiles of 6 x 4 vectors; AVX2 (16): 4 x 2.
  constexpr int kRows = kLanes == 16 ? 6 : 4, kVecs = kLanes == 16 ? 4 : 2;
  constexpr int64_t kStep = kVecs * kLanes;
  const int64_t vec_width = width / kStep * kStep;
  const int64_t n_tiles = (m / kRows + m % kRows / 4 + m % kRows % 4) * (vec_width / kStep);
  const int64_t per_tile = prefetch == nullptr ? 0 : prefetch->total / (n_tiles > 0 ? n_tiles : 1) + 1;
  auto tiles = [&](auto rows, int64_t i) {  // rows: a TileRows<kRows>
    for (int64_t c = 0; c < vec_width; c += kStep) {
      RankTile<decltype(rows)::value, kVecs>(a, block, acc, depth, m, n, i, p + c, c);
      if (prefetch != nullptr) prefetch->Issue(per_tile);
    }
  };
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) tiles(TileRows<kRows>(), i);
  for (; i + 4 <= m; i += 4) tiles(TileRows<4>(), i);
  for (; i < m; ++i) tiles(TileRows<1>(), i);
  if (prefetch != nullptr) prefetch->Issue(prefetch->total);  // what the tiles left
  for (i = 0; i < m; ++i) {
    for (int64_t c = vec_width; c < width; ++c) {
      float s = acc[i * n + p + c];
      for (int64_t j = 0; j < depth; ++j) s = MaddF(a[j * m + i], block[j * distill::kRankPanel + c], s);
      acc[i * n + p + c] = s;
    }
  }
}

// depth rows of w's panel (width columns from w, rows n apart), widened to float, into the block.
template <typename E>
void WidenBlock(const typename E::Storage* w, float* block, int64_t depth, int64_t width, int64_t n) {
  for (int64_t j = 0; j < depth; ++j) {
    const typename E::Storage* src = w + j * n;
    float* dst = block + j * distill::kRankPanel;
    int64_t c = 0;
    for (; c + kLanes <= width; c += kLanes) FloatT::Store(dst + c, E::Load(src + c));
    if (c < width) FloatT::Store(dst + c, LoadPadded<E>(src + c, width - c, 0.0f));
  }
}

// The same for rows of `type` (not float64), starting `offset` elements into src.
void WidenBlockOf(Type type, const void* src, int64_t offset, float* block, int64_t depth,
                  int64_t width, int64_t n) {
  switch (type) {
    case Type::kHalf:
      return WidenBlock<HalfT>(static_cast<const uint16_t*>(src) + offset, block, depth, width, n);
    case Type::kBfloat16:
      return WidenBlock<Bfloat16T>(static_cast<const uint16_t*>(src) + offset, block, depth, width, n);
    case Type::kFloat:
    case Type::kDouble:  // float64 never comes here (the ops' double paths are scalar)
      return WidenBlock<FloatT>(static_cast<const float*>(src) + offset, block, depth, width, n);
  }
}

// The prefetch of `next`'s rows of src (of `type`, rows n elements apart) into L2.
BlockPrefetch PrefetchOf(Type type, const void* src, const NextBlock& next, int64_t n) {
  const int64_t size = type == Type::kFloat ? sizeof(float) : sizeof(uint16_t);
  return BlockPrefetch(
      next.row < 0 ? nullptr : static_cast<const char*>(src) + (next.row * n + next.col) * size,
      n * size, next.rows, next.width * size);
}

void LinearGrads(const float* a, Type b_type, const void* b, float* acc, Type w_type, const void* w,
                 float* d_a, int64_t k, int64_t m, int64_t n, int64_t col_begin, int64_t col_end) {
  alignas(64) float block[kRankDepth * distill::kRankPanel];
  // d_a's sums in vector lanes over all the columns, added across lanes once at the end. (new[],
  // not a std::vector: its helpers would be symbols that every ISA object defines.)
  const int64_t n_sums = w != nullptr ? k * m : 0;
  Vf* sums = n_sums > 0 ? new Vf[n_sums]() : nullptr;
  for (int64_t p = col_begin; p < col_end; p += distill::kRankPanel) {
    const int64_t width = p + distill::kRankPanel < col_end ? distill::kRankPanel : col_end - p;
    for (int64_t j0 = 0; j0 < k; j0 += kRankDepth) {
      const int64_t depth = k - j0 < kRankDepth ? k - j0 : kRankDepth;
      WidenBlockOf(b_type, b, j0 * n + p, block, depth, width, n);
      BlockPrefetch prefetch = PrefetchOf(b_type, b, NextBlock(j0, depth, k, p, col_end), n);
      RankBlock(a + j0 * m, block, acc, depth, m, n, p, width, &prefetch);
      if (sums != nullptr) ProjectBlockOf(w_type, block, w, p, sums + j0 * m, depth, width, m, n);
    }
  }
  for (int64_t e = 0; e < n_sums; ++e) d_a[e] += SumLanesF(sums[e]);
  delete[] sums;
}

void LinearLogits(const float* a, Type w_type, const void* w, const float* bias, float* out,
                  int64_t k, int64_t m, int64_t n, int64_t col_begin, int64_t col_end) {
  alignas(64) float block[kRankDepth * distill::kRankPanel];
  for (int64_t p = col_begin; p < col_end; p += distill::kRankPanel) {
    const int64_t width = p + distill::kRankPanel < col_end ? distill::kRankPanel : col_end - p;
    for (int64_t i = 0; i < m; ++i) {
      if (bias != nullptr) {
        std::memcpy(out + i * n + p, bias + p, width * sizeof(float));
      } else {
        std::memset(out + i * n + p, 0, width * sizeof(float));
      }
    }
    for (int64_t j0 = 0; j0 < k; j0 += kRankDepth) {
      const int64_t depth = k - j0 < kRankDepth ? k - j0 : kRankDepth;
      WidenBlockOf(w_type, w, j0 * n + p, block, depth, width, n);
      BlockPrefetch prefetch = PrefetchOf(w_type, w, NextBlock(j0, depth, k, p, col_end), n);
      RankBlock(a + j0 * m, block, out, depth, m, n, p, width, &prefetch);
    }
  }
}

// Kernels::linear_grads_bf16: the AVX512_BF16 kernel where the CPU has the instruction and
// TF_KLD_CPU_ISA does not cap the core at "avx512" (AVX-512 without it: for comparisons and tests).
decltype(distill::Kernels::linear_grads_bf16) LinearGradsBf16IfSupported() {
#if defined(__AVX512F__)
  const char* cap = std::getenv("TF_KLD_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) return nullptr;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512bf16")) return &cpu::bf16dp::LinearGradsBf16;
#endif
  return nullptr;
}

}  // namespace
}  // namespace TF_KLD_ISA_NAMESPACE
}  // namespace cpu

namespace distill {

const Kernels& TF_KLD_KERNELS_FN() {
  namespace isa = cpu::TF_KLD_ISA_NAMESPACE;
  static const Kernels kernels = {TF_KLD_ISA_NAME,          &isa::DistillKlPartial,
                                  &isa::DistillKlRowsNarrow, isa::kNarrowCols,
                                  &isa::DistillKlGradient,  &isa::DistillJsdSums,
                                  &isa::DistillJsdSumsNarrow,
                                  &isa::DistillJsdGradient, &isa::DistillExp<false>,
                                  &isa::DistillExp<true>,         &isa::DistillLog,
                                  &isa::DistillExpDouble,
                                  &isa::LinearGrads,
                                  isa::LinearGradsBf16IfSupported(),
                                  &isa::LinearLogits};
  return kernels;
}

}  // namespace distill
}  // namespace tf_kld
