// The generalized JSD's log-ratios to the mixture m = beta p + (1 - beta) q of one element, in
// scalar arithmetic: the CPU core's float64 kernels (distill_cpu_impl.h) and the CUDA core
// (distill_gpu.cu.h, float and double, on the device and in the harness's CPU replay) take them
// from here. No TensorFlow, no CUDA needed. The CPU core's SIMD JsdLogs, the XLA lowering and
// reference.log_ratios take the same cases in their own arithmetic.
//
// Straight from d = lq - lp, with no rounded lm cancelled against lp and lq:
//   rp = lp - lm = -log1p((1 - beta) expm1(d)),   rq = lq - lm = -log1p(beta expm1(-d)).
// The side e^-|d| bounds (p's where d <= 0) for every d; the other where |d| <= kRatioBound, and
// beyond it as the first minus |d|, where nothing cancels. log1p(s) is taken as log(u), u = 1 + s
// computed as a sum of positive terms, where u is below 1/2. d not finite (masked classes): -log(beta)
// or -log(1 - beta) on the finite side, NaN on the other (whose terms are 0). beta below
// kRatioMinBeta (not a normal float, nor then 1 + s): lm by log-sum-exp (-inf where p = q = 0).
#ifndef TF_KLD_CC_KERNELS_DISTILL_RATIOS_H_
#define TF_KLD_CC_KERNELS_DISTILL_RATIOS_H_

#include <cmath>

#if defined(__CUDACC__) || defined(__CUDA__)
#define TF_KLD_RATIOS_FN __host__ __device__ __forceinline__
#else
#define TF_KLD_RATIOS_FN inline __attribute__((always_inline))
#endif

namespace tf_kld {
namespace distill {

constexpr float kRatioBound = 64.0f;
constexpr double kRatioMinBeta = 0x1p-125;

// beta and its logs in the compute type C; tiny: beta < kRatioMinBeta.
template <typename C>
struct Mixture {
  C beta, one_minus_beta, log_beta, log1m_beta;  // log(beta), log1p(-beta)
  bool tiny;
};

namespace {  // internal linkage: the CPU ISA objects each keep their own copy

template <typename C>
TF_KLD_RATIOS_FN Mixture<C> MixtureOf(double beta, double log_beta, double log1m_beta) {
  return {static_cast<C>(beta), static_cast<C>(1.0 - beta), static_cast<C>(log_beta),
          static_cast<C>(log1m_beta), !(beta >= kRatioMinBeta)};
}

// -log1p(s), s = u - 1, as -log(u) where u is below 1/2.
template <typename M, typename C>
TF_KLD_RATIOS_FN C NegLog1p(C u, C s) {
  return -(u < C(0.5) ? M::Log(u) : M::Log1p(s));
}

// rp and rq of one element from lp, lq. M: static Exp, Expm1, Log, Log1p of C.
template <typename M, typename C>
TF_KLD_RATIOS_FN void LogRatios(C lp, C lq, const Mixture<C>& mix, C* rp, C* rq) {
  const C minus_inf = C(-INFINITY);
  const C d = lq - lp;
  if (mix.tiny) {
    const C x1 = lp + mix.log_beta, x2 = lq + mix.log1m_beta;
    const C hi = x1 >= x2 ? x1 : x2, lo = x1 >= x2 ? x2 : x1;
    const C lm = x1 == minus_inf && x2 == minus_inf ? minus_inf : hi + M::Log1p(M::Exp(lo - hi));
    *rp = lp - lm, *rq = lq - lm;
  } else if (d - d == C(0)) {  // finite
    const bool up = d > C(0);  // q > p: q's side is the bounded one
    const C ad = up ? d : -d;
    const C x = up ? mix.one_minus_beta : mix.beta, y = up ? mix.beta : mix.one_minus_beta;
    const C k = M::Expm1(-ad);
    const C bounded = NegLog1p<M>(x + y * M::Exp(-ad), y * k);
    C other = bounded - ad;
    if (ad <= C(kRatioBound)) {
      const C big = M::Exp(ad);
      other = NegLog1p<M>(y + x * big, -x * (k * big));
    }
    *rp = up ? other : bounded, *rq = up ? bounded : other;
  } else {
    *rp = lq == minus_inf && lp - lp == C(0) ? -mix.log_beta : C(NAN);
    *rq = lp == minus_inf && lq - lq == C(0) ? -mix.log1m_beta : C(NAN);
  }
}

}  // namespace
}  // namespace distill
}  // namespace tf_kld

#undef TF_KLD_RATIOS_FN

#endif  // TF_KLD_CC_KERNELS_DISTILL_RATIOS_H_
