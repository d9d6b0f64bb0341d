// XLA lowering of the distillation family (TfKld>KlDivergenceWithLogits, TfKld>GeneralizedJsdWithLogits
// and their gradients), so graphs that hold the ops compile under jit_compile / autoclustering.
//
// The HLO is tf_kld.reference's log-softmax composite per element (max subtraction, lp - lq, no
// clipping, the same -inf/NaN conventions), which XLA fuses; the outputs are the CPU kernels'
// (loss and per-row stats, so the gradient ops read the same stats either way). float16/bfloat16
// compute in float32, and float32 row sums accumulate in float64 as in the CPU kernels. As there,
// float32 and 16-bit rows take their maxima of the raw logits and divide the distances to them by
// T ((x - max) / T, exact where it counts, not x / T - max(x / T)); the stats hold max / T in
// float64, from which the gradient recovers the raw maximum exactly; float64 rows divide first.
//
// Registration: see xla_registration.h (once per process and backend, at load).
#include <cmath>
#include <vector>

#include "cc/kernels/distill_attrs.h"
#include "cc/kernels/distill_cpu.h"
#include "cc/kernels/xla_registration.h"
#include "tensorflow/compiler/tf2xla/xla_helpers.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "xla/hlo/builder/xla_builder.h"

namespace tf_kld {

using tensorflow::DataType;
using tensorflow::OpKernelConstruction;
using tensorflow::TensorShape;
using tensorflow::XlaHelpers;
using tensorflow::XlaOpKernel;
using tensorflow::XlaOpKernelContext;

namespace {

absl::Status CheckLogits(const TensorShape& t, const TensorShape& p) {
  if (t.dims() < 1 || p.dims() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have rank >= 1 (the loss reduces the last axis), got y_true ",
        t.DebugString(), " and y_pred ", p.DebugString()));
  }
  if (t != p) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have the same shape, got y_true ", t.DebugString(), " and y_pred ",
        p.DebugString(), "; tf_kld broadcasts them before calling the op"));
  }
  return absl::OkStatus();
}

// The [rows..., classes] layout of one op's logits, with its types and per-row helpers.
class Rows {
 public:
  // `shape`: the logits' shape; `type`: their dtype; `temperature` divides them.
  Rows(XlaOpKernelContext* ctx, const TensorShape& shape, DataType type, double temperature)
      : ctx_(ctx), b_(ctx->builder()), shape_(shape), type_(type), temperature_(temperature) {
    work_ = (type == tensorflow::DT_HALF || type == tensorflow::DT_BFLOAT16) ? tensorflow::DT_FLOAT
                                                                            : type;
    // float32 sums in float64, as the CPU kernels; 16-bit types keep their float32 sum (rounded to
    // 16 bits at the end).
    sum_ = type == tensorflow::DT_FLOAT ? tensorflow::DT_DOUBLE : work_;
    last_ = shape.dims() - 1;
    for (int i = 0; i < last_; ++i) row_dims_.push_back(i), row_sizes_.push_back(shape.dim_size(i));
  }

  DataType type() const { return type_; }
  DataType work() const { return work_; }
  DataType sum() const { return sum_; }
  bool empty_rows() const { return shape_.dim_size(last_) == 0; }
  const std::vector<int64_t>& row_sizes() const { return row_sizes_; }

  xla::XlaOp Literal(DataType type, double v) const { return XlaHelpers::FloatLiteral(b_, type, v); }
  xla::XlaOp MinusInf() const { return Literal(work_, -INFINITY); }
  // A [rows..., classes] array of v, in the compute type.
  xla::XlaOp Full(double v) const { return xla::Broadcast(Literal(work_, v), shape_.dim_sizes()); }
  xla::XlaOp Zeros() const { return Full(0.0); }

  // The temperature in the compute type. The barrier keeps XLA's simplifier from turning x / T
  // into x * (1 / T), which rounds differently from the CPU kernels and the composite.
  xla::XlaOp Temperature() const {
    return xla::OptimizationBarrier(Literal(work_, temperature_));
  }
  // x divided by the temperature (in the compute type).
  xla::XlaOp OverT(xla::XlaOp x) const { return temperature_ == 1.0 ? x : xla::Div(x, Temperature()); }
  // Whether maxima are of the raw logits (float32 and 16-bit types) or of x / T (float64).
  bool raw_maxima() const { return work_ != tensorflow::DT_DOUBLE; }
  // x in the compute type: raw where the maxima are, else divided by the temperature.
  xla::XlaOp Logits(xla::XlaOp x) const {
    x = XlaHelpers::ConvertElementType(x, work_);
    return raw_maxima() ? x : OverT(x);
  }
  // The temperature the CPU kernels divide by, in float64 (float32's for raw maxima), behind a
  // barrier (a division, not a multiplication by 1 / T).
  xla::XlaOp StatTemperature() const {
    const double t = raw_maxima() ? static_cast<double>(static_cast<float>(temperature_)) : temperature_;
    return xla::OptimizationBarrier(Literal(tensorflow::DT_DOUBLE, t));
  }
  // A row maximum of Logits() as its stat (raw: divided by T in float64), and back from the stat
  // (exact: within two float64 ulps of a float), broadcast along the classes.
  xla::XlaOp MaxStat(xla::XlaOp max) const {
    const xla::XlaOp m = XlaHelpers::ConvertElementType(max, tensorflow::DT_DOUBLE);
    return raw_maxima() ? xla::Div(m, StatTemperature()) : m;
  }
  xla::XlaOp MaxOfStat(xla::XlaOp stats, int i) const {
    xla::XlaOp column = xla::Reshape(xla::SliceInDim(stats, i, i + 1, 1, last_), row_sizes_);
    if (raw_maxima()) column = xla::Mul(column, StatTemperature());
    return Expand(XlaHelpers::ConvertElementType(column, work_));
  }
  // (x - max) in the units of lp: divided by T where x is raw.
  xla::XlaOp Shifted(xla::XlaOp x, xla::XlaOp max) const {
    const xla::XlaOp d = xla::Sub(x, max);
    return raw_maxima() ? OverT(d) : d;
  }
  // A per-row value (row shape) broadcast along the classes.
  xla::XlaOp Expand(xla::XlaOp row) const {
    return xla::BroadcastInDim(row, shape_.dim_sizes(), row_dims_);
  }
  xla::XlaOp Max(xla::XlaOp x) const {
    return xla::Reduce(x, MinusInf(), *ctx_->GetOrCreateMax(work_), {last_});
  }
  // Sum over the classes, in the sum type.
  xla::XlaOp Sum(xla::XlaOp x) const {
    return xla::Reduce(XlaHelpers::ConvertElementType(x, sum_), Literal(sum_, 0.0),
                       *ctx_->GetOrCreateAdd(sum_), {last_});
  }
  // A per-row value as a [rows..., 1] float64 column of the stats.
  xla::XlaOp StatColumn(xla::XlaOp row) const {
    std::vector<int64_t> sizes = row_sizes_;
    sizes.push_back(1);
    return xla::Reshape(XlaHelpers::ConvertElementType(row, tensorflow::DT_DOUBLE), sizes);
  }
  xla::XlaOp Stats(const std::vector<xla::XlaOp>& rows) const {
    std::vector<xla::XlaOp> columns;
    for (const xla::XlaOp& row : rows) columns.push_back(StatColumn(row));
    return xla::ConcatInDim(b_, columns, last_);
  }
  // Column i of the stats [rows..., k] in float64, broadcast along the classes.
  xla::XlaOp Stat64(xla::XlaOp stats, int i) const {
    return Expand(xla::Reshape(xla::SliceInDim(stats, i, i + 1, 1, last_), row_sizes_));
  }
  // Column i of the stats [rows..., k], in the compute type, broadcast along the classes.
  xla::XlaOp Stat(xla::XlaOp stats, int i) const {
    const xla::XlaOp column = xla::Reshape(xla::SliceInDim(stats, i, i + 1, 1, last_), row_sizes_);
    return Expand(XlaHelpers::ConvertElementType(column, work_));
  }
  // The outputs of an empty last axis: loss 0 and all-zero stats, as the CPU kernels.
  void SetEmpty(int stats) const {
    ctx_->SetOutput(0, xla::Broadcast(XlaHelpers::Zero(b_, type_), row_sizes_));
    std::vector<int64_t> sizes = row_sizes_;
    sizes.push_back(stats);
    ctx_->SetOutput(1, xla::Broadcast(XlaHelpers::Zero(b_, tensorflow::DT_DOUBLE), sizes));
  }

 private:
  XlaOpKernelContext* ctx_;
  xla::XlaBuilder* b_;
  TensorShape shape_;
  DataType type_, work_, sum_;
  double temperature_;
  int64_t last_;
  std::vector<int64_t> row_dims_, row_sizes_;
};

// log_softmax of one set of logits x (Rows::Logits): the row max's stat, log sum exp((x - max) / T)
// (sum type) and lp = (x - max) / T - log sum (compute type). NaN or +inf anywhere, or a row of
// all -inf, make the row's lp NaN (x - max is NaN there), as in the composite.
struct LogSoftmax {
  LogSoftmax(const Rows& r, xla::XlaOp x) {
    row_max = r.Max(x);
    max = r.MaxStat(row_max);
    const xla::XlaOp shifted = r.Shifted(x, r.Expand(row_max));
    log_sum = xla::Log(r.Sum(xla::Exp(shifted)));
    lp = xla::Sub(shifted, r.Expand(XlaHelpers::ConvertElementType(log_sum, r.work())));
  }
  xla::XlaOp row_max, max, log_sum, lp;  // row_max: of x (compute type); max: its stat
};

// sum(p (lp - lq)) over the classes, lp - lq as -d (Distance's: lp and lq themselves carry ulps
// of their magnitude, which cost the KL 3-50x the composite's error at 1000+ classes): 0 where
// p = 0 (lp = -inf), +inf where p > 0 and q = 0, NaN propagates (reference._kl_terms).
xla::XlaOp KlSum(const Rows& r, xla::XlaOp lp, xla::XlaOp lq, xla::XlaOp d) {
  const xla::XlaOp minus_inf = r.MinusInf(), zeros = r.Zeros();
  const xla::XlaOp infinite = xla::And(xla::Eq(lq, minus_inf), xla::Gt(lp, minus_inf));
  const xla::XlaOp use = xla::And(xla::Ne(lp, minus_inf), xla::Not(infinite));
  const xla::XlaOp term = xla::Select(use, xla::Neg(xla::Mul(xla::Exp(lp), d)),
                                      xla::Select(infinite, r.Full(INFINITY), zeros));
  return r.Sum(term);
}

// log(beta p + (1 - beta) q) by log-sum-exp; -inf where p = q = 0 (reference._log_mixture).
xla::XlaOp LogMixture(const Rows& r, xla::XlaOp lp, xla::XlaOp lq, const distill::JsdParams& params) {
  const xla::XlaOp minus_inf = r.MinusInf();
  const xla::XlaOp x1 = xla::Add(lp, r.Literal(r.work(), params.log_beta));
  const xla::XlaOp x2 = xla::Add(lq, r.Literal(r.work(), params.log1m_beta));
  const xla::XlaOp first = xla::Ge(x1, x2);  // false at NaN: then lo is the NaN, and lm NaN
  const xla::XlaOp hi = xla::Select(first, x1, x2), lo = xla::Select(first, x2, x1);
  const xla::XlaOp lm = xla::Add(hi, xla::Log1p(xla::Exp(xla::Sub(lo, hi))));
  const xla::XlaOp empty = xla::And(xla::Eq(x1, minus_inf), xla::Eq(x2, minus_inf));
  return xla::Select(empty, r.Full(-INFINITY), lm);
}

// d = lq - lp to ulps of itself (distill_jsd.h): ((b - a) - (max_b - max_a)) / T - (log sum_b -
// log sum_a) in float64 (exact differences of the logits where the CPU core takes TwoSum's, which
// XLA's simplifier could reassociate), from Rows::Logits values and their rows' maxima (compute
// type, broadcast) and log-sums (any float type, broadcast); +-inf or NaN at masked classes.
xla::XlaOp Distance(const Rows& r, xla::XlaOp a, xla::XlaOp b, xla::XlaOp max_a, xla::XlaOp max_b,
                    xla::XlaOp log_a, xla::XlaOp log_b) {
  auto f64 = [](xla::XlaOp x) { return XlaHelpers::ConvertElementType(x, tensorflow::DT_DOUBLE); };
  xla::XlaOp d = xla::Sub(xla::Sub(f64(b), f64(a)), xla::Sub(f64(max_b), f64(max_a)));
  if (r.raw_maxima()) d = xla::Div(d, r.StatTemperature());
  d = xla::Sub(d, xla::Sub(f64(log_b), f64(log_a)));
  return XlaHelpers::ConvertElementType(d, r.work());
}

// rp = lp - lm and rq = lq - lm as reference.log_ratios takes them: straight from d = lq - lp
// (Distance's) as -log1p((1 - beta) expm1(d)) and -log1p(beta expm1(-d)), the side
// e^-|d| bounds for every d, the other where |d| <= distill::kRatioBound and as the first minus |d|
// beyond; masked classes (d not finite) -log(beta) or -log(1 - beta) on the finite side, NaN on
// the other; beta below distill::kRatioMinBeta by LogMixture. log1p(s) is XLA's where u = 1 + s,
// computed as a sum of positive terms, is at least 1/2, and log(u) below; not the CPU core's
// log(u) + (s - (u - 1)) (2 - u), whose u - 1 XLA's simplifier would reassociate.
void LogRatios(const Rows& r, xla::XlaOp lp, xla::XlaOp lq, xla::XlaOp d_raw, const distill::JsdParams& params,
               xla::XlaOp* rp, xla::XlaOp* rq) {
  if (!(params.beta >= distill::kRatioMinBeta)) {
    const xla::XlaOp lm = LogMixture(r, lp, lq, params);
    *rp = xla::Sub(lp, lm), *rq = xla::Sub(lq, lm);
    return;
  }
  auto c = [&](double v) { return r.Literal(r.work(), v); };
  const xla::XlaOp beta = c(params.beta), one_minus_beta = c(1.0 - params.beta);
  const xla::XlaOp finite = xla::IsFinite(d_raw);
  const xla::XlaOp d = xla::Select(finite, d_raw, r.Zeros());
  const xla::XlaOp ad = xla::Abs(d);
  const xla::XlaOp up = xla::Gt(d, c(0.0));  // q > p: q's side is the bounded one
  const xla::XlaOp x = xla::Select(up, r.Full(1.0 - params.beta), r.Full(params.beta));
  const xla::XlaOp y = xla::Select(up, r.Full(params.beta), r.Full(1.0 - params.beta));
  const xla::XlaOp e = xla::Exp(xla::Neg(ad)), k = xla::Expm1(xla::Neg(ad));
  const xla::XlaOp near = xla::Le(ad, c(distill::kRatioBound));
  const xla::XlaOp big = xla::Exp(xla::Select(near, ad, r.Zeros()));  // e^|d|, 1 beyond the bound
  auto neg_log1p = [&](xla::XlaOp u, xla::XlaOp s) {
    return xla::Neg(xla::Select(xla::Lt(u, c(0.5)), xla::Log(u), xla::Log1p(s)));
  };
  const xla::XlaOp bounded = neg_log1p(xla::Add(x, xla::Mul(y, e)), xla::Mul(y, k));
  const xla::XlaOp other =
      xla::Select(near, neg_log1p(xla::Add(y, xla::Mul(x, big)), xla::Neg(xla::Mul(x, xla::Mul(k, big)))),
                  xla::Sub(bounded, ad));
  const xla::XlaOp nan = r.Full(NAN);
  const xla::XlaOp q_zero = xla::And(xla::Eq(lq, r.MinusInf()), xla::IsFinite(lp));
  const xla::XlaOp p_zero = xla::And(xla::Eq(lp, r.MinusInf()), xla::IsFinite(lq));
  *rp = xla::Select(finite, xla::Select(up, other, bounded),
                    xla::Select(q_zero, r.Full(-params.log_beta), nan));
  *rq = xla::Select(finite, xla::Select(up, bounded, other),
                    xla::Select(p_zero, r.Full(-params.log1m_beta), nan));
}

// p rp elementwise (p = exp(lp), r a log-ratio of p's), 0 where p = 0, NaN propagates.
xla::XlaOp RatioTerms(const Rows& r, xla::XlaOp lp, xla::XlaOp rp) {
  return xla::Select(xla::Eq(lp, r.MinusInf()), r.Zeros(), xla::Mul(xla::Exp(lp), rp));
}

// The JSD's terms (distill_jsd.h's JsdTerm): p beta (1 - beta) d^2 K(d) where |d| <= 1, K by
// its series (JsdSeries' coefficients, kJsdSeriesFloat of them in float), else beta p rp +
// (1 - beta) q rq from their terms prp, qrq; 0 where both classes are masked (d is NaN there).
xla::XlaOp JsdTerms(const Rows& r, xla::XlaOp lp, xla::XlaOp d, xla::XlaOp prp, xla::XlaOp qrq,
                    const distill::JsdParams& params) {
  auto c = [&](double v) { return r.Literal(r.work(), v); };
  const int terms = r.work() == tensorflow::DT_DOUBLE ? distill::kJsdSeries : distill::kJsdSeriesFloat;
  const xla::XlaOp near = xla::Le(xla::Abs(d), c(distill::kJsdSeriesBound));
  const xla::XlaOp dn = xla::Select(near, d, r.Zeros());
  xla::XlaOp k = c(params.series[terms - 1]);
  for (int j = terms - 2; j >= 0; --j) k = xla::Add(xla::Mul(k, dn), c(params.series[j]));
  const xla::XlaOp series =
      xla::Mul(xla::Exp(lp), xla::Mul(c(params.beta * (1.0 - params.beta)), xla::Mul(xla::Mul(dn, dn), k)));
  const xla::XlaOp far = xla::Add(xla::Mul(c(params.beta), prp), xla::Mul(c(1.0 - params.beta), qrq));
  return xla::Select(near, series, far);
}

class KlDivergenceWithLogitsXlaOp : public XlaOpKernel {
 public:
  explicit KlDivergenceWithLogitsXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_VALUE(temperature_, ctx, ReadTemperature(ctx));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape shape = ctx->InputShape(0);
    OP_REQUIRES_OK(ctx, CheckLogits(shape, ctx->InputShape(1)));
    const Rows r(ctx, shape, ctx->input_type(0), temperature_);
    if (r.empty_rows()) return r.SetEmpty(distill::kStats);
    const xla::XlaOp x = r.Logits(ctx->Input(0)), y = r.Logits(ctx->Input(1));
    const LogSoftmax a(r, x), b(r, y);
    const xla::XlaOp d = Distance(r, x, y, r.Expand(a.row_max), r.Expand(b.row_max), r.Expand(a.log_sum),
                                  r.Expand(b.log_sum));
    const xla::XlaOp kl = KlSum(r, a.lp, b.lp, d);
    ctx->SetOutput(0, XlaHelpers::ConvertElementType(kl, r.type()));
    ctx->SetOutput(1, r.Stats({a.max, a.log_sum, b.max, b.log_sum, kl}));
  }

 private:
  double temperature_ = 1.0;
};

class GeneralizedJsdWithLogitsXlaOp : public XlaOpKernel {
 public:
  explicit GeneralizedJsdWithLogitsXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadJsdParams(ctx));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape shape = ctx->InputShape(0);
    OP_REQUIRES_OK(ctx, CheckLogits(shape, ctx->InputShape(1)));
    const Rows r(ctx, shape, ctx->input_type(0), params_.temperature);
    if (r.empty_rows()) return r.SetEmpty(distill::kJsdStats);
    const xla::XlaOp x = r.Logits(ctx->Input(0)), y = r.Logits(ctx->Input(1));
    const LogSoftmax a(r, x), b(r, y);
    const xla::XlaOp d = Distance(r, x, y, r.Expand(a.row_max), r.Expand(b.row_max), r.Expand(a.log_sum),
                                  r.Expand(b.log_sum));
    xla::XlaOp rp, rq;
    LogRatios(r, a.lp, b.lp, d, params_, &rp, &rq);
    // KL(p || m), KL(q || m) for the gradient (consistent with its p = e^lp and rp), and the JSD
    // as a sum of terms that cancel nothing, for the loss.
    const xla::XlaOp prp = RatioTerms(r, a.lp, rp), qrq = RatioTerms(r, b.lp, rq);
    const xla::XlaOp kl_p = r.Sum(prp), kl_q = r.Sum(qrq);
    const xla::XlaOp jsd = r.Sum(JsdTerms(r, a.lp, d, prp, qrq, params_));
    ctx->SetOutput(0, XlaHelpers::ConvertElementType(jsd, r.type()));
    ctx->SetOutput(1, r.Stats({a.max, a.log_sum, b.max, b.log_sum, kl_p, kl_q}));
  }

 private:
  distill::JsdParams params_{};
};

// What the families' gradient ops share: inputs (grad, y_true, y_pred, stats), the need_* attrs,
// and the outputs (an unneeded one has shape [0]).
class DistillGradXlaOp : public XlaOpKernel {
 public:
  explicit DistillGradXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_true", &need_true_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("need_y_pred", &need_pred_));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape shape = ctx->InputShape(1);
    OP_REQUIRES_OK(ctx, CheckLogits(shape, ctx->InputShape(2)));
    TensorShape rows = shape;
    rows.RemoveLastDims(1);
    OP_REQUIRES(ctx, ctx->InputShape(0) == rows,
                absl::InvalidArgumentError(absl::StrCat("grad must have the loss's shape ",
                                                        rows.DebugString(), ", got ",
                                                        ctx->InputShape(0).DebugString())));
    TensorShape stats = rows;
    stats.AddDim(Stats());
    OP_REQUIRES(ctx, ctx->InputShape(3) == stats,
                absl::InvalidArgumentError(absl::StrCat(
                    "stats must have shape ", stats.DebugString(),
                    " (the forward op's second output), got ", ctx->InputShape(3).DebugString())));
    const Rows r(ctx, shape, ctx->input_type(1), Temperature());
    const xla::XlaOp a = r.Logits(ctx->Input(1)), b = r.Logits(ctx->Input(2));
    // g / T per row, rounded to the compute type first, as the CPU kernels.
    const xla::XlaOp gt = xla::Div(XlaHelpers::ConvertElementType(ctx->Input(0), r.work()),
                                   r.Temperature());
    const xla::XlaOp s = ctx->Input(3);
    const xla::XlaOp lp = xla::Sub(r.Shifted(a, r.MaxOfStat(s, 0)), r.Stat(s, 1));
    const xla::XlaOp lq = xla::Sub(r.Shifted(b, r.MaxOfStat(s, 2)), r.Stat(s, 3));
    xla::XlaOp d_true, d_pred;
    Gradients(r, gt, a, b, lp, lq, s, &d_true, &d_pred);
    const xla::XlaOp none = xla::Broadcast(XlaHelpers::Zero(ctx->builder(), r.type()), {0});
    ctx->SetOutput(0, need_true_ ? XlaHelpers::ConvertElementType(d_true, r.type()) : none);
    ctx->SetOutput(1, need_pred_ ? XlaHelpers::ConvertElementType(d_pred, r.type()) : none);
  }

 protected:
  virtual int Stats() const = 0;
  virtual double Temperature() const = 0;
  // Both gradients (compute type) from the per-row g / T, the logits (Rows::Logits), lp, lq and the stats.
  virtual void Gradients(const Rows& r, xla::XlaOp gt, xla::XlaOp a, xla::XlaOp b, xla::XlaOp lp,
                         xla::XlaOp lq, xla::XlaOp stats, xla::XlaOp* d_true,
                         xla::XlaOp* d_pred) const = 0;

 private:
  bool need_true_ = true;
  bool need_pred_ = true;
};

// d_pred = g/T (q - p), d_true = g/T p ((lp - lq) - KL), 0 where p = 0 (teacher logit -inf).
class KlDivergenceWithLogitsGradXlaOp : public DistillGradXlaOp {
 public:
  explicit KlDivergenceWithLogitsGradXlaOp(OpKernelConstruction* ctx) : DistillGradXlaOp(ctx) {
    OP_REQUIRES_VALUE(temperature_, ctx, ReadTemperature(ctx));
  }

 protected:
  int Stats() const override { return distill::kStats; }
  double Temperature() const override { return temperature_; }
  void Gradients(const Rows& r, xla::XlaOp gt, xla::XlaOp a, xla::XlaOp /*b*/, xla::XlaOp lp,
                 xla::XlaOp lq, xla::XlaOp stats, xla::XlaOp* d_true,
                 xla::XlaOp* d_pred) const override {
    const xla::XlaOp g = r.Expand(gt);
    const xla::XlaOp p = xla::Exp(lp), q = xla::Exp(lq);
    *d_pred = xla::Mul(g, xla::Sub(q, p));
    const xla::XlaOp value = xla::Mul(g, xla::Mul(p, xla::Sub(xla::Sub(lp, lq), r.Stat(stats, 4))));
    *d_true = xla::Select(xla::Eq(a, r.MinusInf()), r.Zeros(), value);
  }

 private:
  double temperature_ = 1.0;
};

// d_true = g beta / T p ((lp - lm) - KL(p || m)), d_pred = g (1 - beta) / T q ((lq - lm) - KL(q || m)),
// each 0 where its own logit is -inf.
class GeneralizedJsdWithLogitsGradXlaOp : public DistillGradXlaOp {
 public:
  explicit GeneralizedJsdWithLogitsGradXlaOp(OpKernelConstruction* ctx) : DistillGradXlaOp(ctx) {
    OP_REQUIRES_VALUE(params_, ctx, ReadJsdParams(ctx));
  }

 protected:
  int Stats() const override { return distill::kJsdStats; }
  double Temperature() const override { return params_.temperature; }
  void Gradients(const Rows& r, xla::XlaOp gt, xla::XlaOp a, xla::XlaOp b, xla::XlaOp lp,
                 xla::XlaOp lq, xla::XlaOp stats, xla::XlaOp* d_true,
                 xla::XlaOp* d_pred) const override {
    const xla::XlaOp d = Distance(r, a, b, r.MaxOfStat(stats, 0), r.MaxOfStat(stats, 2), r.Stat64(stats, 1),
                                  r.Stat64(stats, 3));
    xla::XlaOp rp, rq;
    LogRatios(r, lp, lq, d, params_, &rp, &rq);
    const xla::XlaOp minus_inf = r.MinusInf(), zeros = r.Zeros();
    auto side = [&](xla::XlaOp x, xla::XlaOp lx, xla::XlaOp rx, double weight, int kl) {
      const xla::XlaOp g = r.Expand(xla::Mul(gt, r.Literal(r.work(), weight)));
      const xla::XlaOp value = xla::Mul(g, xla::Mul(xla::Exp(lx), xla::Sub(rx, r.Stat(stats, kl))));
      return xla::Select(xla::Eq(x, minus_inf), zeros, value);
    };
    *d_true = side(a, lp, rp, params_.beta, 4);
    *d_pred = side(b, lq, rq, 1.0 - params_.beta, 5);
  }

 private:
  distill::JsdParams params_{};
};

// Once per copy, whichever thread comes first (a function-local static is initialised exactly
// once; others wait for it).
int Registered() {
  using xla_registration::Create;
  static const int backends = xla_registration::RegisterXlaKernels(
      {{"TfKld>KlDivergenceWithLogits", &Create<KlDivergenceWithLogitsXlaOp>},
       {"TfKld>KlDivergenceWithLogitsGrad", &Create<KlDivergenceWithLogitsGradXlaOp>},
       {"TfKld>GeneralizedJsdWithLogits", &Create<GeneralizedJsdWithLogitsXlaOp>},
       {"TfKld>GeneralizedJsdWithLogitsGrad", &Create<GeneralizedJsdWithLogitsGradXlaOp>}});
  return backends;
}

[[maybe_unused]] const int registered_on_load = Registered();

}  // namespace
}  // namespace tf_kld

// Lets tf_kld's loader see (with ctypes) that this library lowers the distillation ops to XLA.
extern "C" __attribute__((visibility("default"))) int TfKldDistillHasXlaLowering() { return 1; }
// How many XLA backends this copy registered the distillation lowering for: 0 when another copy
// had registered it (diagnostics and tests).
extern "C" __attribute__((visibility("default"))) int TfKldDistillXlaBackendsRegistered() {
  return tf_kld::Registered();
}
