// The distillation family's CPU core interface: divergences between the softmaxes of two rows of
// logits, plain loops over contiguous memory, no TensorFlow.
//
// The core (distill_cpu_impl.h) is compiled into the same per-ISA objects as the KL core
// (kld_cpu_generic.cc, kld_cpu_avx2.cc, kld_cpu_avx512.cc), sharing their SIMD helpers; Cpu()
// follows the KL core's choice of ISA.
//
// KL(p || q) of one row, one pass (see shared/DISTILLATION_NOTES.md): with a = y_true / T,
// b = y_pred / T, running maxima max_a, max_b, sum_a = sum exp(a - max_a),
// sum_b = sum exp(b - max_b), cross = sum exp(a - max_a) * (a - b); partials of pieces of a row
// merge by rescaling to the larger maximum, and
//   KL = cross / sum_a - (max_a + log sum_a) + (max_b + log sum_b).
#ifndef TF_KLD_CC_KERNELS_DISTILL_CPU_H_
#define TF_KLD_CC_KERNELS_DISTILL_CPU_H_

#include <cmath>
#include <cstdint>

#include "cc/kernels/distill_jsd.h"
#include "cc/kernels/kld_cpu.h"

namespace tf_kld {
namespace distill {

using cpu::Type;

// The per-row statistics the forward op outputs and the gradient reads, as doubles:
// [max_a, log sum_a, max_b, log sum_b, KL]. lp = (a - max_a) - log sum_a keeps a - max_a exact
// for huge logits, where rounding lse_a to float would not. float32 and 16-bit rows (every ISA,
// the CUDA core and the XLA lowering alike) take the maxima of the raw logits and sum exps of
// (x - max) / T (exact distances at any T, no division per element); their max_a is that float
// maximum divided by the float temperature in double, from which the readers get the float
// maximum back exactly. float64 rows divide first: max_a is the maximum of x / T.
constexpr int kStats = 5;

// The running state of one row, or of a piece of it.
struct KlPartial {
  double max_a = -INFINITY;
  double sum_a = 0.0;
  double cross = 0.0;
  double max_b = -INFINITY;
  double sum_b = 0.0;
  bool nan = false;       // a NaN or +inf logit in either row: the row's KL is NaN
  bool infinite = false;  // a class with p > 0 and q = 0 (student -inf, teacher not): +inf
};

// Scale of a sum taken at maximum m to the maximum m_new >= m (1 when equal, -inf included).
inline double Rescale(double m, double m_new) { return m == m_new ? 1.0 : std::exp(m - m_new); }

// x followed by y (the order fixed by the caller: results never depend on the thread count).
inline KlPartial Merge(const KlPartial& x, const KlPartial& y) {
  KlPartial r;
  r.max_a = x.max_a > y.max_a ? x.max_a : y.max_a;
  r.max_b = x.max_b > y.max_b ? x.max_b : y.max_b;
  const double xa = Rescale(x.max_a, r.max_a), ya = Rescale(y.max_a, r.max_a);
  const double xb = Rescale(x.max_b, r.max_b), yb = Rescale(y.max_b, r.max_b);
  r.sum_a = x.sum_a * xa + y.sum_a * ya;
  r.cross = x.cross * xa + y.cross * ya;
  r.sum_b = x.sum_b * xb + y.sum_b * yb;
  r.nan = x.nan || y.nan;
  r.infinite = x.infinite || y.infinite;
  return r;
}

// A KlPartial as kBlockState doubles (the flags as 0 / 1), for states kept between ops
// (TfKld>KlDivergenceWithLogitsBlock); the initial state (no columns yet) is KlPartial{}.
constexpr int kBlockState = 7;
inline void Save(const KlPartial& s, double* out) {
  out[0] = s.max_a, out[1] = s.sum_a, out[2] = s.cross, out[3] = s.max_b, out[4] = s.sum_b;
  out[5] = s.nan ? 1.0 : 0.0, out[6] = s.infinite ? 1.0 : 0.0;
}
inline KlPartial Load(const double* in) {
  KlPartial s;
  s.max_a = in[0], s.sum_a = in[1], s.cross = in[2], s.max_b = in[3], s.sum_b = in[4];
  s.nan = in[5] != 0.0, s.infinite = in[6] != 0.0;
  return s;
}

// The row's KL and statistics (stats[kStats]) from its whole-row state; cols > 0.
inline double Finish(const KlPartial& s, double* stats) {
  const double nan = NAN;
  const double log_a = std::log(s.sum_a), log_b = std::log(s.sum_b);
  double kl;
  if (s.nan || s.max_a == -INFINITY || s.max_b == -INFINITY || std::isnan(s.sum_a) ||
      std::isnan(s.sum_b) || std::isnan(s.cross)) {
    kl = nan;  // NaN or +inf logits (they make a sum NaN), or a row of all -inf
  } else if (s.infinite) {
    kl = INFINITY;
  } else {
    kl = s.cross / s.sum_a - (s.max_a - s.max_b) - (log_a - log_b);
  }
  stats[0] = s.max_a, stats[1] = log_a, stats[2] = s.max_b, stats[3] = log_b, stats[4] = kl;
  return kl;
}

// Generalized JSD (0 < beta < 1): a first pass as KL's gives each row's maxima and log-sums; a
// second pass sums, with m = beta p + (1 - beta) q, KL(p || m) = sum p (lp - lm) and KL(q || m) =
// sum q (lq - lm) for the gradient, and JSD = beta KL(p || m) + (1 - beta) KL(q || m) as a sum of
// terms that cancel nothing for the loss (distill_jsd.h's kJsdSums).
// Stats: [max_a, log sum_a, max_b, log sum_b, KL(p || m), KL(q || m)].
constexpr int kJsdStats = 6;

// The per-element arithmetic (the log-ratios lp - lm and lq - lm straight from d = lq - lp, the
// terms) is distill_jsd.h's, whose scalar form the float64 kernels take.

struct JsdParams {
  double temperature, beta, log_beta, log1m_beta;  // log(beta), log1p(-beta)
  double ratio_threshold;                          // RatioThreshold(beta)
  double series[kJsdSeries];                       // JsdSeries(beta)
};

// TfKld>GeneralizedJsdWithLogitsBlock's state per row: the kJsdStats stats, then the loss's sum
// (kJsdSums' last) of the columns so far.
constexpr int kJsdBlockState = kJsdStats + 1;

// FinishJsd (the row's JSD from its second-pass sums): distill_jsd.h's.

struct Kernels {
  const char* isa;
  // The state of n contiguous elements of one row (y_true, y_pred of `type`), divided by temperature.
  KlPartial (*kl_partial)(Type type, const void* y_true, const void* y_pred, int64_t n,
                          double temperature);
  // The statistics (kStats each, as Finish writes them) of `rows` whole rows of cols <= narrow_cols
  // elements, kLanes rows at a time across SIMD lanes: narrow rows without per-row overhead.
  // Values as Finish(kl_partial(...)), up to rounding. Not float64 (NaN stats).
  void (*kl_rows_narrow)(Type type, const void* y_true, const void* y_pred, int64_t rows,
                         int64_t cols, double temperature, double* stats);
  int64_t narrow_cols;
  // d/dy_true and/or d/dy_pred (nullptr: not wanted) for flat elements [begin, end) of
  // [*, cols] inputs, from each row's upstream gradient and stats.
  void (*kl_gradient)(Type type, const void* grad, const void* y_true, const void* y_pred,
                      const double* stats, void* d_true, void* d_pred, int64_t begin, int64_t end,
                      int64_t cols, double temperature);
  // The second JSD pass over n contiguous elements of one row, given its first four stats: adds
  // to its kJsdSums sums.
  void (*jsd_sums)(Type type, const void* y_true, const void* y_pred, int64_t n,
                   const JsdParams& params, const double* stats, double* sums);
  // The same for `rows` whole rows of cols <= narrow_cols elements, kLanes rows at a time across
  // SIMD lanes (as kl_rows_narrow), each row's kJsdStats stats given (the first four set): sets
  // row r's kJsdSums sums at sums[kJsdSums r]. Values as jsd_sums', up to rounding. Not float64
  // (NaN sums).
  void (*jsd_sums_narrow)(Type type, const void* y_true, const void* y_pred, int64_t rows,
                          int64_t cols, const JsdParams& params, const double* stats, double* sums);
  // JSD gradients as kl_gradient, from kJsdStats stats per row:
  // d_true = g beta / T p ((lp - lm) - KL(p || m)), d_pred = g (1 - beta) / T q ((lq - lm) - KL(q || m)).
  void (*jsd_gradient)(Type type, const void* grad, const void* y_true, const void* y_pred,
                       const double* stats, void* d_true, void* d_pred, int64_t begin, int64_t end,
                       int64_t cols, const JsdParams& params);
  // exp of n floats with the core's vectorised exp (for tests of its accuracy).
  void (*exp)(const float* x, float* out, int64_t n);
  // The same for x <= 0 or NaN with the form the loops use (the same bits as exp there).
  void (*exp_nonpositive)(const float* x, float* out, int64_t n);
  // log of n doubles with the narrow rows' vectorised log (for tests of its accuracy).
  void (*log)(const double* x, double* out, int64_t n);
  // exp of n doubles <= 0 with the factors' vectorised exp (KL running sums; for tests).
  void (*exp_double)(const double* x, double* out, int64_t n);
  // The chunked linear loss's gradients of one chunk, for row-major a [k, m], b [k, n], acc and w
  // [m, n] (w of `w_type`, not float64) and d_a [k, m]: in place, for every i < m, j < k and the
  // columns c in [col_begin, col_end),
  //   acc[i][c] += sum_j a[j][i] * b[j][c]   (j in order: the kernel gradient summed over chunks)
  //   d_a[j][i] += sum_c b[j][c] * w[i][c]   (the hidden states' gradient; w nullptr: skipped).
  // Each column's arithmetic depends only on col_begin's and col_end's position in the grid of
  // kRankPanel columns, and d_a's sum runs over the columns in order: split the columns at multiples
  // of it, give each piece its own d_a, add those in order, and results never depend on the split.
  // b may be 16-bit (b_type; widened exactly in cache, a panel at a time).
  void (*linear_grads)(const float* a, Type b_type, const void* b, float* acc, Type w_type,
                       const void* w, float* d_a, int64_t k, int64_t m, int64_t n,
                       int64_t col_begin, int64_t col_end);
  // linear_grads' acc alone for bfloat16 a and b, by AVX512_BF16 dot products (two products into a
  // float32 lane per instruction), the sums scaled once: for every i < m and c in
  // [col_begin, col_end), acc[i][c] += scale * sum_j a[j][i] * b[j][c], with a given as pairs of
  // its rows, a_pairs[q][i] = a[2q][i] | a[2q + 1][i] << 16 ([(k + 1) / 2, m], the upper half of
  // the last pair 0 for odd k). Results never depend on a split of the columns at multiples of
  // kRankPanel. nullptr where the build or the CPU lacks the instruction.
  void (*linear_grads_bf16)(const uint32_t* a_pairs, const uint16_t* b, float* acc, int64_t k,
                            int64_t m, int64_t n, int64_t col_begin, int64_t col_end, float scale);
  // The chunked linear loss's logits: for row-major a [k, m] (the chunk's hidden states,
  // transposed), w [k, n] of `w_type` (not float64), bias [n] (nullptr: none) and out [m, n],
  //   out[i][c] = bias[c] + sum_j a[j][i] * w[j][c]   (j in order, float32 arithmetic)
  // for every i < m and the columns c in [col_begin, col_end): w's 16-bit values are widened in
  // cache, a panel at a time (never a float32 copy of w). Each column's arithmetic is the same
  // under any split of the columns at multiples of kRankPanel.
  void (*linear_logits)(const float* a, Type w_type, const void* w, const float* bias, float* out,
                        int64_t k, int64_t m, int64_t n, int64_t col_begin, int64_t col_end);
};

// linear_grads' panel: columns taken at a time (a multiple of every build's vector width).
constexpr int64_t kRankPanel = 256;

TF_KLD_CPU_HIDDEN const Kernels& GenericKernels();
TF_KLD_CPU_HIDDEN const Kernels& Avx2Kernels();  // only call when the CPU has AVX2, FMA and F16C
TF_KLD_CPU_HIDDEN const Kernels& Avx512Kernels();  // ... and AVX-512 F, BW, VL and DQ

// The kernels of the ISA the KL core chose (cpu::Cpu()).
TF_KLD_CPU_HIDDEN const Kernels& Cpu();

}  // namespace distill
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_DISTILL_CPU_H_
