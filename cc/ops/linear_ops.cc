// Registration of the fused linear loss's helper op (tf_kld.linear_distillation_loss) and its shape
// function.
#include <tuple>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_kld {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// acc [m, n], a [k, m], b [k, n]: out is acc's shape.
absl::Status AccumulateShape(InferenceContext* c) {
  ShapeHandle acc, a, b;
  for (auto [i, name, shape] : {std::tuple<int, const char*, ShapeHandle*>{0, "acc", &acc},
                                {1, "a", &a}, {2, "b", &b}}) {
    if (!c->WithRank(c->input(i), 2, shape).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be a matrix, got ",
                                                     c->DebugString(c->input(i))));
    }
  }
  DimensionHandle k, m, n;
  if (!c->Merge(c->Dim(a, 0), c->Dim(b, 0), &k).ok() ||
      !c->Merge(c->Dim(acc, 0), c->Dim(a, 1), &m).ok() ||
      !c->Merge(c->Dim(acc, 1), c->Dim(b, 1), &n).ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "acc [m, n], a [k, m] and b [k, n] do not match: acc ", c->DebugString(acc), ", a ",
        c->DebugString(a), ", b ", c->DebugString(b)));
  }
  c->set_output(0, c->Matrix(m, n));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfKld>AccumulateTransposedMatMul")
    .Input("acc: T")
    .Input("a: T")
    .Input("b: T")
    .Output("out: T")
    .Attr("T: {float, double}")
    .SetShapeFn(AccumulateShape)
    .Doc(R"doc(
out = acc + matmul(a, b, transpose_a=True), for acc [m, n], a [k, m] and b [k, n]: the weight
gradient of one chunk of rows added to the running sum, with no [m, n] temporary. out takes over
acc's buffer whenever TensorFlow allows it (acc has no other reader); otherwise acc is copied first,
so the op is pure either way. Each sum runs over k in order, so results never depend on the number
of threads. CPU only.
)doc");

}  // namespace tf_kld
