// Registration of the fused linear loss's helper op (tf_kld.linear_distillation_loss) and its shape
// function.
#include <tuple>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_kld {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// acc [m, n], a [k, m], b [k, n], w [m, n]: out is acc's shape, d_a a's.
absl::Status AccumulateShape(InferenceContext* c) {
  ShapeHandle acc, a, b, w;
  for (auto [i, name, shape] : {std::tuple<int, const char*, ShapeHandle*>{0, "acc", &acc},
                                {1, "a", &a}, {2, "b", &b}, {3, "w", &w}}) {
    if (!c->WithRank(c->input(i), 2, shape).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be a matrix, got ",
                                                     c->DebugString(c->input(i))));
    }
  }
  tensorflow::DataType t, tw;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("Tw", &tw));
  if ((t == tensorflow::DT_DOUBLE) != (tw == tensorflow::DT_DOUBLE)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "w must be float64 exactly when acc, a and b are (float32 sums take a float32 or 16-bit w), "
        "got ", tensorflow::DataTypeString(t), " and w ", tensorflow::DataTypeString(tw)));
  }
  DimensionHandle k, m, n, m2, n2;
  if (!c->Merge(c->Dim(a, 0), c->Dim(b, 0), &k).ok() ||
      !c->Merge(c->Dim(acc, 0), c->Dim(a, 1), &m).ok() ||
      !c->Merge(c->Dim(acc, 1), c->Dim(b, 1), &n).ok() || !c->Merge(m, c->Dim(w, 0), &m2).ok() ||
      !c->Merge(n, c->Dim(w, 1), &n2).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "acc [m, n], a [k, m], b [k, n] and w [m, n] do not match: acc ", c->DebugString(acc),
        ", a ", c->DebugString(a), ", b ", c->DebugString(b), ", w ", c->DebugString(w)));
  }
  bool with_d_a = true;
  TF_RETURN_IF_ERROR(c->GetAttr("with_d_a", &with_d_a));
  c->set_output(0, c->Matrix(m2, n2));
  c->set_output(1, with_d_a ? c->Matrix(k, m2) : c->Matrix(0, m2));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfKld>AccumulateLinearGrads")
    .Input("acc: T")
    .Input("a: T")
    .Input("b: T")
    .Input("w: Tw")
    .Output("out: T")
    .Output("d_a: T")
    .Attr("T: {float, double}")
    .Attr("Tw: {half, bfloat16, float, double}")
    .Attr("with_d_a: bool = true")
    .SetShapeFn(AccumulateShape)
    .Doc(R"doc(
One chunk's gradients of a linear layer y = a @ w from b = dL/dy, in one pass over w's columns:
out = acc + matmul(a, b, transpose_a=True) (the kernel gradient summed over chunks, with no [m, n]
temporary) and d_a = matmul(b, w, transpose_b=True) (the inputs' gradient), for acc and w [m, n],
a [k, m] and b [k, n]. out takes over acc's buffer whenever TensorFlow allows it (acc has no other
reader); otherwise acc is copied first, so the op is pure either way. w may be 16-bit (read as
float32); T=double needs Tw=double. with_d_a=false leaves d_a out (shape [0, m]; w is not read).
Sums run in a fixed order: results never depend on the number of threads. CPU only.
)doc");

}  // namespace tf_kld
