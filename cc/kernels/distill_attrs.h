// Reading the distillation ops' attributes, shared by their CPU and XLA kernels.
#ifndef TF_KLD_CC_KERNELS_DISTILL_ATTRS_H_
#define TF_KLD_CC_KERNELS_DISTILL_ATTRS_H_

#include <charconv>
#include <cmath>
#include <string>
#include <system_error>

#include "cc/kernels/distill_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tf_kld {

// A double carried as a float attr `name` and, exactly, as decimal text in `name`_f64 (a TensorFlow
// float attr holds 32 bits); the text wins when not empty and `exact` (float64, or always for beta).
inline absl::StatusOr<double> ReadDoubleAttr(tensorflow::OpKernelConstruction* ctx,
                                             const std::string& name, bool exact) {
  float v32 = 0.0f;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, &v32));
  std::string v64;
  TF_RETURN_IF_ERROR(ctx->GetAttr(name + "_f64", &v64));
  if (!exact || v64.empty()) return v32;
  // std::from_chars, not strtod: it ignores the C locale (see kld_attrs.h).
  double v = 0.0;
  const char* const end = v64.data() + v64.size();
  const std::from_chars_result parsed = std::from_chars(v64.data(), end, v);
  if (parsed.ec != std::errc() || parsed.ptr != end) {
    return absl::InvalidArgumentError(absl::StrCat("attr ", name, "_f64 must be a decimal number, got \"",
                                                   v64, "\""));
  }
  return v;
}

// The temperature: the float attr, or for float64 the exact double carried as text (a TensorFlow
// float attr holds 32 bits). Must be finite and > 0 (tf_kld checks it before building the op).
inline absl::StatusOr<double> ReadTemperature(tensorflow::OpKernelConstruction* ctx) {
  tensorflow::DataType type;
  TF_RETURN_IF_ERROR(ctx->GetAttr("T", &type));
  double t = 1.0;
  TF_ASSIGN_OR_RETURN(t, ReadDoubleAttr(ctx, "temperature", type == tensorflow::DT_DOUBLE));
  if (!(std::isfinite(t) && t > 0.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number > 0, got ", t));
  }
  return t;
}

// The JSD's parameters; beta strictly inside (0, 1) (tf_kld sends the ends to the KL op).
inline absl::StatusOr<distill::JsdParams> ReadJsdParams(tensorflow::OpKernelConstruction* ctx) {
  distill::JsdParams params;
  TF_ASSIGN_OR_RETURN(params.temperature, ReadTemperature(ctx));
  TF_ASSIGN_OR_RETURN(params.beta, ReadDoubleAttr(ctx, "beta", true));
  if (!(params.beta > 0.0 && params.beta < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "beta must be in (0, 1) for this op, got ", params.beta,
        " (beta 0 and 1 are KL divergences: use TfKld>KlDivergenceWithLogits)"));
  }
  params.log_beta = std::log(params.beta);
  params.log1m_beta = std::log1p(-params.beta);
  params.ratio_threshold = distill::RatioThreshold(params.beta);
  distill::JsdSeries(params.beta, params.series);
  return params;
}

}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_DISTILL_ATTRS_H_
