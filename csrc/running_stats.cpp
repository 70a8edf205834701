// CPU kernel of densenet_fast::update_running_stats (defined in densenet_fast/graph.py; the
// arithmetic is ops/batchnorm.py's update_running_stats): a block's batch statistics folded
// into its BNs' running statistics, as nn.BatchNorm2d folds them.
//
// The reference is a handful of _foreach operations, one launch each on CUDA; on the CPU a
// _foreach operation loops over its tensors, and each product with a Python number converts
// that number to a tensor first: about 15 dispatches per BN, two BNs per dense layer, more
// than the arithmetic on vectors of a few hundred channels. Here it is one loop per BN.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>

namespace densenet_fast {
namespace {

void check_running_stats_args(at::TensorList running_mean, at::TensorList running_var,
                              at::TensorList tracked, at::TensorList mean, at::TensorList var,
                              size_t momenta) {
  const size_t bns = running_mean.size();
  TORCH_CHECK_VALUE(running_var.size() == bns && tracked.size() == bns && mean.size() == bns &&
                        var.size() == bns && momenta == bns,
                    "update_running_stats takes one entry per BN in every list, got ", bns,
                    " running means, ", running_var.size(), " running variances, ",
                    tracked.size(), " counters, ", mean.size(), " means, ", var.size(),
                    " variances and ", momenta, " momenta");
  for (size_t i = 0; i < bns; ++i) {
    const int64_t channels = mean[i].numel();
    const std::pair<const char*, const at::Tensor*> vectors[] = {
        {"running_mean", &running_mean[i]}, {"running_var", &running_var[i]},
        {"mean", &mean[i]}, {"var", &var[i]}};
    for (const auto& [what, t] : vectors) {
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, what, " of BN ", i,
                        " must have shape (", channels, ",), got ", t->sizes());
      TORCH_CHECK_TYPE(t->is_floating_point(), what, " of BN ", i,
                       " must be floating point, got ", t->scalar_type());
      TORCH_CHECK(t->device().is_cpu(), what, " of BN ", i, " is on ", t->device());
    }
    TORCH_CHECK_TYPE(mean[i].scalar_type() == var[i].scalar_type(), "var of BN ", i,
                     " must have its mean's dtype ", mean[i].scalar_type(), ", got ",
                     var[i].scalar_type());
    TORCH_CHECK_TYPE(running_mean[i].scalar_type() == running_var[i].scalar_type(),
                     "running_var of BN ", i, " must have its running_mean's dtype ",
                     running_mean[i].scalar_type(), ", got ", running_var[i].scalar_type());
    TORCH_CHECK_VALUE(tracked[i].numel() == 1 && tracked[i].scalar_type() == at::kLong &&
                          tracked[i].device().is_cpu(),
                      "num_batches_tracked of BN ", i, " must be one int64 on the CPU, got ",
                      tracked[i].scalar_type(), " of shape ", tracked[i].sizes(), " on ",
                      tracked[i].device());
  }
}

// running = running * (1 - factor) + value * factor, the reference's two in-place operations,
// each rounded to the running statistics' dtype; value = batch * batch_scale (the unbiased
// variance's Bessel factor, or 1), rounded to the batch's dtype, then to the running dtype.
template <typename running_t, typename batch_t>
void fold(at::Tensor& running_t_, const at::Tensor& batch_t_, double batch_scale,
          double factor) {
  using acc_t = at::opmath_type<running_t>;
  using batch_acc_t = at::opmath_type<batch_t>;
  running_t* running = running_t_.mutable_data_ptr<running_t>();
  const batch_t* batch = batch_t_.const_data_ptr<batch_t>();
  const int64_t rs = running_t_.stride(0), bs = batch_t_.stride(0);
  const acc_t keep = static_cast<acc_t>(1.0 - factor), take = static_cast<acc_t>(factor);
  const batch_acc_t scale = static_cast<batch_acc_t>(batch_scale);
  for (int64_t c = 0; c < running_t_.size(0); ++c) {
    // A scale of 1 (the mean) is exact: the value passes unchanged.
    const batch_t scaled =
        static_cast<batch_t>(static_cast<batch_acc_t>(batch[c * bs]) * scale);
    const running_t value = static_cast<running_t>(scaled);
    const running_t kept = static_cast<running_t>(static_cast<acc_t>(running[c * rs]) * keep);
    running[c * rs] =
        static_cast<running_t>(static_cast<acc_t>(kept) + take * static_cast<acc_t>(value));
  }
}

void fold_any(at::Tensor running, const at::Tensor& batch, double batch_scale, double factor) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, running.scalar_type(), "update_running_stats", [&] {
        using running_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kBFloat16, at::kHalf, batch.scalar_type(), "update_running_stats", [&] {
              fold<running_t, scalar_t>(running, batch, batch_scale, factor);
            });
      });
}

void update_running_stats_cpu(at::TensorList running_mean, at::TensorList running_var,
                              at::TensorList tracked, at::TensorList mean, at::TensorList var,
                              c10::ArrayRef<std::optional<double>> momentum, c10::SymInt count,
                              const std::optional<at::Tensor>& merged_count) {
  check_running_stats_args(running_mean, running_var, tracked, mean, var, momentum.size());
  const int64_t n = merged_count.has_value() ? merged_count->item<int64_t>() : count.expect_int();
  TORCH_CHECK_VALUE(n >= 2, "update_running_stats needs at least 2 values per channel behind "
                    "the batch statistics (their unbiased variance divides by count - 1), got ", n);
  // Bessel's correction as the reference's scalar takes it: count / (count - 1) in double.
  const double bessel = static_cast<double>(n) / static_cast<double>(n - 1);
  for (size_t i = 0; i < running_mean.size(); ++i) {
    int64_t& batches = tracked[i].mutable_data_ptr<int64_t>()[0];
    batches += 1;
    // momentum None: a cumulative average, 1 / num_batches_tracked.
    const double factor = momentum[i].has_value() ? *momentum[i]
                                                  : 1.0 / static_cast<double>(batches);
    fold_any(running_mean[i], mean[i], 1.0, factor);
    fold_any(running_var[i], var[i], bessel, factor);
    // Written through pointers: the version counters say so, as an in-place ATen operation's
    // would (autograd refuses a backward that saved them before, and so does the block's
    // eval-mode backward, graph.py).
    for (const at::Tensor* t : {&running_mean[i], &running_var[i], &tracked[i]}) {
      t->unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("update_running_stats", &update_running_stats_cpu);
}

}  // namespace densenet_fast
