// Registration of the fused linear loss's helper ops (tf_kld.linear_distillation_loss) and their
// shape functions.
#include <tuple>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_kld {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Tw (the inputs read) is float64 exactly when T (the sums and outputs) is.
absl::Status CheckDoubleAttrs(InferenceContext* c, const char* what) {
  tensorflow::DataType t, tw;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("Tw", &tw));
  if ((t == tensorflow::DT_DOUBLE) != (tw == tensorflow::DT_DOUBLE)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " must be float64 exactly when T is (T=float takes float32 or 16-bit ones), got T ",
        tensorflow::DataTypeString(t), " and Tw ", tensorflow::DataTypeString(tw)));
  }
  return absl::OkStatus();
}

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
  TF_RETURN_IF_ERROR(CheckDoubleAttrs(c, "w"));
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

// h [m, k], w [k, n], bias [n] or [0]: logits [m, n].
absl::Status LinearLogitsShape(InferenceContext* c) {
  ShapeHandle h, w, bias;
  for (auto [i, name, shape] : {std::tuple<int, const char*, ShapeHandle*>{0, "h", &h},
                                {1, "w", &w}}) {
    if (!c->WithRank(c->input(i), 2, shape).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be a matrix, got ",
                                                     c->DebugString(c->input(i))));
    }
  }
  if (!c->WithRank(c->input(2), 1, &bias).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("bias must be a vector, got ",
                                                   c->DebugString(c->input(2))));
  }
  TF_RETURN_IF_ERROR(CheckDoubleAttrs(c, "h and w"));
  DimensionHandle k;
  if (!c->Merge(c->Dim(h, 1), c->Dim(w, 0), &k).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("h [m, k] and w [k, n] do not match: h ",
                                                   c->DebugString(h), ", w ", c->DebugString(w)));
  }
  DimensionHandle nb = c->Dim(bias, 0), n = c->Dim(w, 1);
  if (c->ValueKnown(nb) && c->Value(nb) != 0 && !c->Merge(n, nb, &n).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("bias must have w's columns (or none: [0]), got "
                                                   "bias ", c->DebugString(bias), ", w ",
                                                   c->DebugString(w)));
  }
  c->set_output(0, c->Matrix(c->Dim(h, 0), n));
  return absl::OkStatus();
}

// acc [m, n], block [m, nb], offset []: out is acc's shape.
absl::Status AddColumnsShape(InferenceContext* c) {
  ShapeHandle acc, block, offset;
  if (!c->WithRank(c->input(0), 2, &acc).ok() || !c->WithRank(c->input(1), 2, &block).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("acc and block must be matrices, got acc ",
                                                   c->DebugString(c->input(0)), ", block ",
                                                   c->DebugString(c->input(1))));
  }
  if (!c->WithRank(c->input(2), 0, &offset).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("offset must be a scalar, got ",
                                                   c->DebugString(c->input(2))));
  }
  DimensionHandle m;
  if (!c->Merge(c->Dim(acc, 0), c->Dim(block, 0), &m).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("acc [m, n] and block [m, nb] must have the same "
                                                   "rows, got acc ", c->DebugString(acc),
                                                   ", block ", c->DebugString(block)));
  }
  c->set_output(0, c->Matrix(m, c->Dim(acc, 1)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfKld>LinearLogits")
    .Input("h: Tw")
    .Input("w: Tw")
    .Input("bias: T")
    .Output("logits: T")
    .Attr("T: {float, double}")
    .Attr("Tw: {half, bfloat16, float, double}")
    .SetShapeFn(LinearLogitsShape)
    .Doc(R"doc(
One chunk's logits of a linear layer in float32 (float64 for float64 inputs): h @ w + bias for
h [m, k], w [k, n] and bias [n] (an empty bias: none). 16-bit h and w are widened exactly and the
products summed in float32 (j in order, so results never depend on the number of threads); a
16-bit w is widened a cache-sized panel at a time, never into a float32 copy. T=double needs
Tw=double. CPU only.
)doc");

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

// acc [m, n], a [k, m], b [k, n], scale []: out is acc's shape.
absl::Status AccumulateKernelShape(InferenceContext* c) {
  ShapeHandle acc, a, b, scale;
  for (auto [i, name, shape] : {std::tuple<int, const char*, ShapeHandle*>{0, "acc", &acc},
                                {1, "a", &a}, {2, "b", &b}}) {
    if (!c->WithRank(c->input(i), 2, shape).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be a matrix, got ",
                                                     c->DebugString(c->input(i))));
    }
  }
  if (!c->WithRank(c->input(3), 0, &scale).ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale must be a scalar, got ", c->DebugString(c->input(3))));
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

REGISTER_OP("TfKld>AccumulateKernelGrad")
    .Input("acc: float")
    .Input("a: T")
    .Input("b: T")
    .Input("scale: float")
    .Output("out: float")
    .Attr("T: {half, bfloat16}")
    .SetShapeFn(AccumulateKernelShape)
    .Doc(R"doc(
One chunk's kernel gradient of a linear layer y = a @ w from 16-bit a and b = dL/dy, added in float32:
out = acc + scale * matmul(a, b, transpose_a=True) for acc [m, n], a [k, m], b [k, n] and a scalar
scale, with no [m, n] temporary (out takes over acc's buffer whenever TensorFlow allows it; otherwise
acc is copied first). Products are exact; bfloat16 operands on a CPU with AVX512_BF16 sum by its dot
products (two products per float32 lane and instruction), otherwise a and b are widened to float32 in
cache (a times scale, rounded once). Sums run in a fixed order: results never depend on the number of
threads. CPU only.
)doc");

REGISTER_OP("TfKld>AddColumns")
    .Input("acc: T")
    .Input("block: T")
    .Input("offset: int64")
    .Output("out: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(AddColumnsShape)
    .Doc(R"doc(
acc with block added to its columns [offset, offset + nb): out[:, offset + j] = acc[:, offset + j] +
block[:, j] for acc [m, n] and block [m, nb] (16-bit sums in float32, rounded once). out takes over
acc's buffer whenever TensorFlow allows it (tf_kld.linear writes each column block of a kernel
gradient into one [H, V] buffer this way); otherwise acc is copied first. CPU only.
)doc");

}  // namespace tf_kld
