// Registration of the distillation family's ops (divergences between the softmaxes of two sets of
// logits) and their shape functions.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_kld {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

constexpr int kKlStats = 5;        // distill::kStats
constexpr int kJsdStats = 6;       // distill::kJsdStats
constexpr int kJsdBlockState = 7;  // distill::kJsdBlockState
constexpr int kBlockState = 7;     // distill::kBlockState

// y_true (input first) and y_pred (first + 1): one shape of rank >= 1, into *merged and, without
// its last axis, *rows.
absl::Status MergeLogits(InferenceContext* c, int first, ShapeHandle* merged, ShapeHandle* rows) {
  ShapeHandle t = c->input(first), p = c->input(first + 1);
  if ((c->RankKnown(t) && c->Rank(t) < 1) || (c->RankKnown(p) && c->Rank(p) < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have rank >= 1 (the loss reduces the last axis), got y_true ",
        c->DebugString(t), " and y_pred ", c->DebugString(p)));
  }
  if (!c->Merge(t, p, merged).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have the same shape, got y_true ", c->DebugString(t),
        " and y_pred ", c->DebugString(p), "; tf_kld broadcasts them before calling the op"));
  }
  return c->Subshape(*merged, 0, -1, rows);
}

template <int kStats>
absl::Status ForwardShape(InferenceContext* c) {
  ShapeHandle merged, rows, stats;
  TF_RETURN_IF_ERROR(MergeLogits(c, 0, &merged, &rows));
  TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(kStats), &stats));
  c->set_output(0, rows);
  c->set_output(1, stats);
  return absl::OkStatus();
}

template <int kStats>
absl::Status GradShape(InferenceContext* c) {
  ShapeHandle merged, rows, unused, stats;
  TF_RETURN_IF_ERROR(MergeLogits(c, 1, &merged, &rows));
  if (!c->Merge(c->input(0), rows, &unused).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("grad must have the loss's shape ",
                                                   c->DebugString(rows), ", got ",
                                                   c->DebugString(c->input(0))));
  }
  TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(kStats), &stats));
  if (!c->Merge(c->input(3), stats, &unused).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("stats must have shape ", c->DebugString(stats),
                                                   " (the forward op's second output), got ",
                                                   c->DebugString(c->input(3))));
  }
  bool need_true = true, need_pred = true;
  TF_RETURN_IF_ERROR(c->GetAttr("need_y_true", &need_true));
  TF_RETURN_IF_ERROR(c->GetAttr("need_y_pred", &need_pred));
  c->set_output(0, need_true ? merged : c->Vector(0));
  c->set_output(1, need_pred ? merged : c->Vector(0));
  return absl::OkStatus();
}

// The block ops: y_true, y_pred [rows, n] and a carried input [rows, kWidth] (named `carried`):
// the carried output (its shape), loss [rows] and, with kStatsOut, stats [rows, kKlStats].
template <int kWidth, bool kStatsOut>
absl::Status BlockShape(InferenceContext* c) {
  const char* carried = kStatsOut ? "state" : "stats";
  ShapeHandle t, p, in, merged;
  if (!c->WithRank(c->input(0), 2, &t).ok() || !c->WithRank(c->input(1), 2, &p).ok() ||
      !c->Merge(t, p, &merged).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must be matrices of one shape [rows, block], got y_true ",
        c->DebugString(c->input(0)), " and y_pred ", c->DebugString(c->input(1))));
  }
  DimensionHandle rows, width;
  if (!c->WithRank(c->input(2), 2, &in).ok() ||
      !c->Merge(c->Dim(in, 0), c->Dim(merged, 0), &rows).ok() ||
      !c->WithValue(c->Dim(in, 1), kWidth, &width).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(carried, " must have shape [rows, ", kWidth,
                                                   "] with y_true's rows ", c->DebugString(merged),
                                                   ", got ", c->DebugString(c->input(2))));
  }
  c->set_output(0, c->Matrix(rows, kWidth));
  c->set_output(1, c->Vector(rows));
  if (kStatsOut) c->set_output(2, c->Matrix(rows, kKlStats));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfKld>KlDivergenceWithLogits")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("stats: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .SetShapeFn(ForwardShape<kKlStats>)
    .Doc(R"doc(
KL(softmax(y_true / T) || softmax(y_pred / T)) over the last axis, in log-space, one pass over
each row. A class with y_true = -inf contributes 0; y_pred = -inf where y_true is not gives +inf;
NaN or +inf logits, and rows of all -inf, give NaN; an empty last axis gives 0.

loss: y_pred's shape without the last axis.
stats: per row [max_a, log sum exp(a - max_a), max_b, log sum exp(b - max_b), KL] in double
  (a = y_true / T, b = y_pred / T), read by TfKld>KlDivergenceWithLogitsGrad.
temperature: T (rounded to float32, as float16/bfloat16/float32 compute).
temperature_f64: for T=double, the exact T as decimal text (a float attr has 32 bits); empty means
  use temperature.
)doc");

REGISTER_OP("TfKld>KlDivergenceWithLogitsBlock")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("state: double")
    .Output("state_out: double")
    .Output("loss: T")
    .Output("stats: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .SetShapeFn(BlockShape<kBlockState, true>)
    .Doc(R"doc(
TfKld>KlDivergenceWithLogits over rows given a block of columns at a time (tf_kld.linear's column
blocks, whose logits never exist whole): y_true, y_pred [rows, block] are the next columns of each
row, state [rows, 7] the running state of the columns before them (max_a, sum exp(a - max_a),
cross, max_b, sum exp(b - max_b), a NaN flag, an infinity flag; start from
tf_kld.ops.kl_block_initial_state). state_out adds the block (it may take over state's buffer);
loss and stats are what TfKld>KlDivergenceWithLogits gives for the columns seen so far, so after
the last block they are the whole rows' (stats read by TfKld>KlDivergenceWithLogitsGrad, which
takes any block of columns with the whole rows' stats). An empty block changes nothing. CPU only.
)doc");

REGISTER_OP("TfKld>KlDivergenceWithLogitsGrad")
    .Input("grad: T")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("stats: double")
    .Output("d_y_true: T")
    .Output("d_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .Attr("need_y_true: bool = true")
    .Attr("need_y_pred: bool = true")
    .SetShapeFn(GradShape<kKlStats>)
    .Doc(R"doc(
Gradients of TfKld>KlDivergenceWithLogits in one pass from its stats:
d_y_pred = grad / T * (q - p), d_y_true = grad / T * p * ((log p - log q) - KL) (0 where p = 0).
An output not needed (need_y_true / need_y_pred false) is not computed and has shape [0].
)doc");

REGISTER_OP("TfKld>GeneralizedJsdWithLogits")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("loss: T")
    .Output("stats: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .Attr("beta: float = 0.5")
    .Attr("beta_f64: string = ''")
    .SetShapeFn(ForwardShape<kJsdStats>)
    .Doc(R"doc(
Generalized Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q,
of p = softmax(y_true / T) and q = softmax(y_pred / T) over the last axis, for 0 < beta < 1
(tf_kld routes beta 0 and 1 to TfKld>KlDivergenceWithLogits). Two passes over each row, the second in
cache; log m by log-sum-exp.

stats: per row [max_a, log sum exp(a - max_a), max_b, log sum exp(b - max_b), KL(p || m), KL(q || m)].
beta_f64: beta as decimal text, exact (used when not empty).
)doc");

REGISTER_OP("TfKld>GeneralizedJsdWithLogitsBlock")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("stats: double")
    .Output("stats_out: double")
    .Output("loss: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .Attr("beta: float = 0.5")
    .Attr("beta_f64: string = ''")
    .SetShapeFn(BlockShape<kJsdBlockState, false>)
    .Doc(R"doc(
The second pass of TfKld>GeneralizedJsdWithLogits a block of columns at a time (tf_kld.linear's
column blocks): stats [rows, 7] holds the whole rows' first four stats (max_a, log sum_a, max_b,
log sum_b: TfKld>KlDivergenceWithLogitsBlock's after the last block), then the sums KL(p || m),
KL(q || m) of the columns before this block as the gradient reads them, and the JSD as the loss
sums it (terms that cancel nothing; 0 to start); stats_out adds this
block's (it may take over stats' buffer) and loss is the JSD of the sums so far, so after the last
block stats_out's first six are what TfKld>GeneralizedJsdWithLogitsGrad reads and loss the rows'
JSD. CPU only.
)doc");

REGISTER_OP("TfKld>GeneralizedJsdWithLogitsGrad")
    .Input("grad: T")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Input("stats: double")
    .Output("d_y_true: T")
    .Output("d_y_pred: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("temperature: float = 1.0")
    .Attr("temperature_f64: string = ''")
    .Attr("beta: float = 0.5")
    .Attr("beta_f64: string = ''")
    .Attr("need_y_true: bool = true")
    .Attr("need_y_pred: bool = true")
    .SetShapeFn(GradShape<kJsdStats>)
    .Doc(R"doc(
Gradients of TfKld>GeneralizedJsdWithLogits in one pass from its stats:
d_y_true = grad beta / T p ((lp - lm) - KL(p || m)), d_y_pred = grad (1 - beta) / T q ((lq - lm) - KL(q || m)).
)doc");

}  // namespace tf_kld
