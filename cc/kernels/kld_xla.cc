// XLA lowering of both ops, so graphs that hold them compile under jit_compile / autoclustering
// (e.g. a tf.function traced outside XLA and then called from a jit-compiled one).
//
// The HLO is the composite itself (clip, divide, log, multiply, reduce), which XLA fuses into one
// loop; float16/bfloat16 compute in float32 as on every other tf_kld path, and float32 rows are
// summed in float64 as the CPU kernel sums them.
//
// Registration: see xla_registration.h (once per process and backend, at load).
#include <vector>

#include "cc/kernels/kld.h"
#include "cc/kernels/kld_attrs.h"
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

// The operands of both ops, converted to the compute type, with the clip helpers.
struct Operands {
  Operands(XlaOpKernelContext* ctx, int first, double eps) {
    type = ctx->input_type(first);
    work = (type == tensorflow::DT_HALF || type == tensorflow::DT_BFLOAT16) ? tensorflow::DT_FLOAT
                                                                           : type;
    xla::XlaBuilder* b = ctx->builder();
    t = XlaHelpers::ConvertElementType(ctx->Input(first), work);
    p = XlaHelpers::ConvertElementType(ctx->Input(first + 1), work);
    epsilon = XlaHelpers::FloatLiteral(b, work, eps);
    one = XlaHelpers::One(b, work);
  }
  // max(min(x, 1), eps): XLA's min/max propagate NaN, as tf.clip_by_value does.
  xla::XlaOp Clip(xla::XlaOp x) const { return xla::Max(xla::Min(x, one), epsilon); }
  // Where the clip passes the gradient: eps <= x <= 1 (false at NaN).
  xla::XlaOp Inside(xla::XlaOp x) const { return xla::And(xla::Ge(x, epsilon), xla::Le(x, one)); }

  DataType type, work;
  xla::XlaOp t, p, epsilon, one;
};

absl::Status CheckShapes(const TensorShape& t, const TensorShape& p) {
  if (t.dims() < 1 || t != p) {
    return absl::InvalidArgumentError(absl::StrCat(
        "y_true and y_pred must have one shape of rank >= 1, got y_true ", t.DebugString(),
        " and y_pred ", p.DebugString()));
  }
  return absl::OkStatus();
}

class KlDivergenceXlaOp : public XlaOpKernel {
 public:
  explicit KlDivergenceXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_VALUE(eps_, ctx, ReadEpsilon(ctx));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape shape = ctx->InputShape(0);
    OP_REQUIRES_OK(ctx, CheckShapes(shape, ctx->InputShape(1)));
    const Operands in(ctx, 0, eps_);
    const xla::XlaOp tc = in.Clip(in.t);
    const xla::XlaOp terms = xla::Mul(tc, xla::Log(xla::Div(tc, in.Clip(in.p))));
    // float32 terms are summed in float64 and rounded once, as by the CPU kernel (a float32 sum of
    // a wide row drifts by several ulp); 16-bit types keep their float32 sum.
    const DataType sum = in.type == tensorflow::DT_FLOAT ? tensorflow::DT_DOUBLE : in.work;
    const xla::XlaOp loss = xla::Reduce(XlaHelpers::ConvertElementType(terms, sum),
                                        XlaHelpers::Zero(ctx->builder(), sum),
                                        *ctx->GetOrCreateAdd(sum), {shape.dims() - 1});
    ctx->SetOutput(0, XlaHelpers::ConvertElementType(loss, in.type));
  }

 private:
  double eps_ = 0.0;
};

class KlDivergenceGradXlaOp : public XlaOpKernel {
 public:
  explicit KlDivergenceGradXlaOp(OpKernelConstruction* ctx) : XlaOpKernel(ctx) {
    OP_REQUIRES_VALUE(eps_, ctx, ReadEpsilon(ctx));
    OP_REQUIRES_VALUE(wrt_, ctx, ReadWrt(ctx));
  }

  void Compile(XlaOpKernelContext* ctx) override {
    const TensorShape shape = ctx->InputShape(1);
    OP_REQUIRES_OK(ctx, CheckShapes(shape, ctx->InputShape(2)));
    const Operands in(ctx, 1, eps_);
    std::vector<int64_t> rows(shape.dims() - 1);
    for (int i = 0; i < shape.dims() - 1; ++i) rows[i] = i;
    const xla::XlaOp g = xla::BroadcastInDim(
        XlaHelpers::ConvertElementType(ctx->Input(0), in.work), shape.dim_sizes(), rows);
    const xla::XlaOp zero = xla::Broadcast(XlaHelpers::Zero(ctx->builder(), in.work), shape.dim_sizes());
    const xla::XlaOp tc = in.Clip(in.t);
    xla::XlaOp out;
    if (!UseFusedGradient(eps_)) {
      // eps <= 0: autodiff's expressions of the composite, so 0 * inf gives its NaN (see kld.h).
      // The barriers keep XLA's simplifier from rewriting a * (1 / r) as a / r and (a / b) / c as
      // a / (b * c), whose b * c underflows to 0 where the composite's quotients do not.
      const xla::XlaOp pc = in.Clip(in.p);
      const xla::XlaOp r = xla::Div(tc, pc);
      const xla::XlaOp gr = xla::Mul(xla::Mul(g, tc), xla::OptimizationBarrier(xla::Div(in.one, r)));
      if (wrt_ == Wrt::kYTrue) {
        out = xla::Select(in.Inside(in.t), xla::Add(xla::Mul(g, xla::Log(r)), xla::Div(gr, pc)), zero);
      } else {
        const xla::XlaOp q = xla::OptimizationBarrier(xla::Div(xla::Neg(tc), pc));
        out = xla::Select(in.Inside(in.p), xla::Mul(gr, xla::Div(q, pc)), zero);
      }
    } else if (wrt_ == Wrt::kYTrue) {
      out = xla::Select(in.Inside(in.t),
                        xla::Mul(g, xla::Add(xla::Log(xla::Div(tc, in.Clip(in.p))), in.one)), zero);
    } else {
      out = xla::Select(in.Inside(in.p), xla::Neg(xla::Div(xla::Mul(g, tc), in.p)), zero);
    }
    ctx->SetOutput(0, XlaHelpers::ConvertElementType(out, in.type));
  }

 private:
  double eps_ = 0.0;
  Wrt wrt_ = Wrt::kYPred;
};

constexpr char kForward[] = "TfKld>KlDivergence";
constexpr char kGrad[] = "TfKld>KlDivergenceGrad";

// Once per copy, whichever thread comes first (a function-local static is initialised exactly
// once; others wait for it).
int Registered() {
  static const int backends = xla_registration::RegisterXlaKernels(
      {{kForward, &xla_registration::Create<KlDivergenceXlaOp>},
       {kGrad, &xla_registration::Create<KlDivergenceGradXlaOp>}});
  return backends;
}

[[maybe_unused]] const int registered_on_load = Registered();

}  // namespace
}  // namespace tf_kld

// Lets tf_kld's loader see (with ctypes) that this library lowers itself to XLA.
extern "C" __attribute__((visibility("default"))) int TfKldHasXlaLowering() { return 1; }
// How many XLA backends this copy of the library registered the lowering for: 0 when another copy
// had registered it (diagnostics and tests).
extern "C" __attribute__((visibility("default"))) int TfKldXlaBackendsRegistered() {
  return tf_kld::Registered();
}
