// XLA lowering of both ops, so graphs that hold them compile under jit_compile / autoclustering
// (e.g. a tf.function traced outside XLA and then called from a jit-compiled one).
//
// The HLO is the composite itself (clip, divide, log, multiply, reduce), which XLA fuses into one
// loop; float16/bfloat16 compute in float32 as on every other tf_kld path.
//
// XLA builds its table of compilation kernels once per process, at the first TensorFlow op. When
// this library loads after that (the usual case: `import tf_kld` after TensorFlow ran anything),
// REGISTER_XLA_OP alone is not seen, so the library registers its kernels for every XLA backend
// itself; when it loads before, XLA picks the REGISTER_XLA_OP entries up as usual.
#include <string>
#include <vector>

#include "cc/kernels/kld_attrs.h"
#include "tensorflow/compiler/tf2xla/xla_helpers.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/kernel_def.pb.h"
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
    const xla::XlaOp loss = xla::Reduce(terms, XlaHelpers::Zero(ctx->builder(), in.work),
                                        *ctx->GetOrCreateAdd(in.work), {shape.dims() - 1});
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
    if (wrt_ == Wrt::kYTrue) {
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

REGISTER_XLA_OP(Name(kForward), KlDivergenceXlaOp);
REGISTER_XLA_OP(Name(kGrad), KlDivergenceGradXlaOp);

template <typename Op>
tensorflow::OpKernel* Create(OpKernelConstruction* ctx) {
  return new Op(ctx);
}

bool HasKernel(const std::string& op, const std::string& device) {
  return tensorflow::KernelsRegisteredForOp(op).find("device='" + device + "'") != std::string::npos;
}

// Registers both lowerings for every XLA backend when XLA's kernel table was built before this
// library loaded (detected by XLA's own Log lowering being registered already, ours not).
struct LateRegistration {
  LateRegistration() {
    for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
      if (!HasKernel("Log", backend) || HasKernel(kForward, backend)) continue;
      Register(kForward, backend, &Create<KlDivergenceXlaOp>);
      Register(kGrad, backend, &Create<KlDivergenceGradXlaOp>);
    }
  }

  void Register(const char* op, const std::string& backend,
                tensorflow::OpKernel* (*factory)(OpKernelConstruction*)) {
    auto def = std::make_unique<tensorflow::KernelDef>();
    def->set_op(op);
    def->set_device_type(backend);
    auto* constraint = def->add_constraint();
    constraint->set_name("T");
    for (DataType type : {tensorflow::DT_HALF, tensorflow::DT_BFLOAT16, tensorflow::DT_FLOAT,
                          tensorflow::DT_DOUBLE}) {
      constraint->mutable_allowed_values()->mutable_list()->add_type(type);
    }
    // The registrar keeps a pointer to the KernelDef: both live as long as the process.
    registrars.push_back(std::make_unique<tensorflow::kernel_factory::OpKernelRegistrar>(
        def.release(), "XlaOpKernel", factory));
  }

  std::vector<std::unique_ptr<tensorflow::kernel_factory::OpKernelRegistrar>> registrars;
};

LateRegistration* const late_registration = new LateRegistration();

}  // namespace
}  // namespace tf_kld

// Lets tf_kld's loader see (with ctypes) that this library lowers itself to XLA.
extern "C" __attribute__((visibility("default"))) int TfKldHasXlaLowering() { return 1; }
