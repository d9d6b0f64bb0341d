// XLA lowering of both ops, so graphs that hold them compile under jit_compile / autoclustering
// (e.g. a tf.function traced outside XLA and then called from a jit-compiled one).
//
// The HLO is the composite itself (clip, divide, log, multiply, reduce), which XLA fuses into one
// loop; float16/bfloat16 compute in float32 as on every other tf_kld path, and float32 rows are
// summed in float64 as the CPU kernel sums them.
//
// Registration: XLA builds its table of compilation kernels once per process, from the
// REGISTER_XLA_OP entries present then (at the first TensorFlow op, usually before this library
// loads), and aborts the process (LOG(FATAL)) when a second library registers an op that is there
// already. So the library never uses REGISTER_XLA_OP: on load it has XLA build its table (a no-op
// when built already), and from then on, the table being final, registers its kernels for each XLA
// backend itself, unless a kernel for the op is registered there already (another copy of this
// library). Check and register happen once per copy (a function-local static); copies do not
// interleave: each registers from its static initialisers, which the dynamic loader runs under
// its lock.
#include <algorithm>
#include <string>
#include <vector>

#include "cc/kernels/kld.h"
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

template <typename Op>
tensorflow::OpKernel* Create(OpKernelConstruction* ctx) {
  return new Op(ctx);
}

bool HasKernel(const std::string& op, const std::string& device) {
  const tensorflow::KernelList kernels = tensorflow::GetRegisteredKernelsForOp(op);
  for (const tensorflow::KernelDef& def : kernels.kernel()) {
    if (def.device_type() == device) return true;
  }
  return false;
}

// Our types that `backend` compiles: those of XLA's own Log lowering there, which XLA registered
// for the intersection of Log's types and the backend's.
std::vector<DataType> BackendTypes(const std::string& backend) {
  std::vector<DataType> types;
  const tensorflow::KernelList log = tensorflow::GetRegisteredKernelsForOp("Log");
  for (const tensorflow::KernelDef& def : log.kernel()) {
    if (def.device_type() != backend) continue;
    for (const auto& constraint : def.constraint()) {
      if (constraint.name() != "T") continue;
      for (DataType type : {tensorflow::DT_HALF, tensorflow::DT_BFLOAT16, tensorflow::DT_FLOAT,
                            tensorflow::DT_DOUBLE}) {
        const auto& allowed = constraint.allowed_values().list().type();
        if (std::find(allowed.begin(), allowed.end(), type) != allowed.end()) types.push_back(type);
      }
    }
  }
  return types;
}

struct Registration {
  std::vector<std::unique_ptr<tensorflow::kernel_factory::OpKernelRegistrar>> registrars;
  int backends = 0;  // how many backends this copy registered for

  void Register(const char* op, const std::string& backend, const std::vector<DataType>& types,
                tensorflow::OpKernel* (*factory)(OpKernelConstruction*)) {
    auto def = std::make_unique<tensorflow::KernelDef>();
    def->set_op(op);
    def->set_device_type(backend);
    auto* constraint = def->add_constraint();
    constraint->set_name("T");
    for (DataType type : types) constraint->mutable_allowed_values()->mutable_list()->add_type(type);
    // The registrar keeps a pointer to the KernelDef: both live as long as the process.
    registrars.push_back(std::make_unique<tensorflow::kernel_factory::OpKernelRegistrar>(
        def.release(), "XlaOpKernel", factory));
  }

  Registration() {
    // Some other build registered these ops with REGISTER_XLA_OP: XLA owns them; adding ours
    // would duplicate its kernels.
    for (const std::string& op : tensorflow::XlaOpRegistry::GetAllRegisteredOps()) {
      if (op == kForward || op == kGrad) return;
    }
    // From here on XLA's table is final: nothing can register in between or after.
    tensorflow::XlaOpRegistry::RegisterCompilationKernels();
    for (const std::string& backend : tensorflow::XlaOpRegistry::BackendNames()) {
      if (HasKernel(kForward, backend) || HasKernel(kGrad, backend)) continue;  // another copy
      const std::vector<DataType> types = BackendTypes(backend);
      if (types.empty()) continue;
      Register(kForward, backend, types, &Create<KlDivergenceXlaOp>);
      Register(kGrad, backend, types, &Create<KlDivergenceGradXlaOp>);
      ++backends;
    }
  }
};

// Once per copy, whichever thread comes first (a function-local static is initialised exactly
// once; others wait for it).
const Registration& Registered() {
  static const Registration* const registration = new Registration();
  return *registration;
}

const Registration& registered_on_load = Registered();

}  // namespace
}  // namespace tf_kld

// Lets tf_kld's loader see (with ctypes) that this library lowers itself to XLA.
extern "C" __attribute__((visibility("default"))) int TfKldHasXlaLowering() { return 1; }
// How many XLA backends this copy of the library registered the lowering for: 0 when another copy
// had registered it (diagnostics and tests).
extern "C" __attribute__((visibility("default"))) int TfKldXlaBackendsRegistered() {
  return tf_kld::Registered().backends;
}
