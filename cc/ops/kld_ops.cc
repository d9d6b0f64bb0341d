// Registration of the KL-divergence ops and their shape functions.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

// The TensorFlow this library is built for, as a marker tf_kld/ops.py finds in the file before loading
// it (a library built for another TensorFlow may not even load, or fail obscurely).
#ifndef TF_KLD_TF_VERSION
#error "TF_KLD_TF_VERSION must name the TensorFlow version (tools/build_flags.py defines it)"
#endif
#define TF_KLD_STRING(x) #x
#define TF_KLD_EXPAND_STRING(x) TF_KLD_STRING(x)
extern "C" __attribute__((visibility("default"), used)) const char TfKldBuildInfo[] =
    "tf_kld-build: tensorflow=" TF_KLD_EXPAND_STRING(TF_KLD_TF_VERSION) ";";

namespace tf_kld {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace {

// y_true and y_pred: one shape (unknown dims stay unknown), rank >= 1.
absl::Status MergeInputs(InferenceContext* c, int y_true, int y_pred, ShapeHandle* merged) {
  ShapeHandle t = c->input(y_true), p = c->input(y_pred);
  if ((c->RankKnown(t) && c->Rank(t) < 1) || (c->RankKnown(p) && c->Rank(p) < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have rank >= 1 (the loss reduces the last axis), got y_true ",
        c->DebugString(t), " and y_pred ", c->DebugString(p)));
  }
  if (!c->Merge(t, p, merged).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have the same shape, got y_true ", c->DebugString(t),
        " and y_pred ", c->DebugString(p),
        "; tf_kld.kl_divergence broadcasts them before calling the op"));
  }
  return absl::OkStatus();
}

absl::Status ForwardShape(InferenceContext* c) {
  ShapeHandle merged, loss;
  TF_RETURN_IF_ERROR(MergeInputs(c, 0, 1, &merged));
  TF_RETURN_IF_ERROR(c->Subshape(merged, 0, -1, &loss));
  c->set_output(0, loss);
  return absl::OkStatus();
}

absl::Status GradShape(InferenceContext* c) {
  ShapeHandle merged, loss, grad;
  TF_RETURN_IF_ERROR(MergeInputs(c, 1, 2, &merged));
  TF_RETURN_IF_ERROR(c->Subshape(merged, 0, -1, &loss));
  if (!c->Merge(c->input(0), loss, &grad).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("grad must have the loss's shape ",
                                                   c->DebugString(loss), ", got ",
                                                   c->DebugString(c->input(0))));
  }
  c->set_output(0, merged);
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfKld>KlDivergence")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("loss: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("epsilon: float = 1e-7")
    .Attr("epsilon_f64: string = ''")
    .SetShapeFn(ForwardShape)
    .Doc(R"doc(
Kullback-Leibler divergence over the last axis: sum(t * log(t / p), axis=-1), where
t = clip(y_true, epsilon, 1) and p = clip(y_pred, epsilon, 1).

y_true: same shape as y_pred, rank >= 1.
loss: y_pred's shape without the last axis.
epsilon: clip floor (already rounded to T by the caller).
epsilon_f64: for T=double, the exact clip floor as decimal text (a float attr has 32 bits);
  empty means use epsilon.
)doc");

REGISTER_OP("TfKld>KlDivergenceGrad")
    .Input("grad: T")
    .Input("y_true: T")
    .Input("y_pred: T")
    .Output("output: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("epsilon: float = 1e-7")
    .Attr("epsilon_f64: string = ''")
    .Attr("wrt: {'y_pred', 'y_true'} = 'y_pred'")
    .SetShapeFn(GradShape)
    .Doc(R"doc(
Gradient of TfKld>KlDivergence with respect to one input, in one pass:
wrt=y_pred: -grad * t / y_pred where epsilon <= y_pred <= 1, else 0;
wrt=y_true: grad * (log(t / p) + 1) where epsilon <= y_true <= 1, else 0.

grad: the upstream gradient of loss.
output: same shape as y_true and y_pred.
)doc");

}  // namespace tf_kld
