"""`DDPMScheduler` with batched steps for parallel sampling."""

import torch
from diffusers import DDPMScheduler

from .scheduling_pcr import PCRSchedulerMixin

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


def vp_predicted_x0(prediction_type: str, model_output, sample, sqrt_alpha_prod, sqrt_beta_prod):
    """`x0` from the model output for `sample = sqrt(alpha_prod) x0 + sqrt(1 - alpha_prod) eps`."""
    if prediction_type == "epsilon":
        return (sample - sqrt_beta_prod * model_output) / sqrt_alpha_prod
    if prediction_type == "sample":
        return model_output
    return sqrt_alpha_prod * sample - sqrt_beta_prod * model_output


def vp_model_output(prediction_type: str, x0, sample, sqrt_alpha_prod, sqrt_beta_prod):
    """The inverse of `vp_predicted_x0`."""
    if prediction_type == "epsilon":
        return (sample - sqrt_alpha_prod * x0) / sqrt_beta_prod
    if prediction_type == "sample":
        return x0
    return (sqrt_alpha_prod * sample - x0) / sqrt_beta_prod


class VPConversionsMixin:
    """`x0` conversions for variance-preserving schedulers whose table holds `sqrt_alpha_prod`, `sqrt_beta_prod`."""

    def _to_x0(self, model_output, sample, c):
        return vp_predicted_x0(
            self.config.prediction_type, model_output, sample, c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
        )

    def _from_x0(self, x0, sample, c):
        return vp_model_output(self.config.prediction_type, x0, sample, c["sqrt_alpha_prod"], c["sqrt_beta_prod"])


def clip_or_threshold(scheduler, x0: torch.Tensor) -> torch.Tensor:
    """The base scheduler's dynamic thresholding or clipping of the predicted sample, for `(n, B, ...)` arrays."""
    if scheduler.config.thresholding:
        return scheduler._threshold_sample(x0.flatten(0, 1)).reshape(x0.shape)
    if scheduler.config.clip_sample:
        return x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


class PCRDDPMScheduler(VPConversionsMixin, PCRSchedulerMixin, DDPMScheduler):
    """DDPM (ancestral sampling of the reverse SDE) with `batch_step`; everything else is `DDPMScheduler`'s.

    Supports every timestep spacing and custom timesteps, prediction types `epsilon`, `sample` and `v_prediction`,
    clipping and dynamic thresholding, and the variance types `fixed_small`, `fixed_small_log`, `fixed_large`,
    `learned` and `learned_range` (the model then outputs twice the channels, the second half its variance, as
    `DDPMScheduler.step` splits them). Steps with `t > 0` draw noise, as in `DDPMScheduler.step`.
    """

    def _step_table(self):
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        if self.config.variance_type not in VARIANCE_TYPES:
            raise self._unsupported("variance_type", self.config.variance_type, VARIANCE_TYPES)
        # The base step's scalar arithmetic, elementwise over all timesteps at once (the same float ops, so the same
        # numbers), on the CPU where diffusers keeps `alphas_cumprod`.
        t = self.timesteps.cpu()
        if self.custom_timesteps or self.num_inference_steps:
            prev_t = torch.cat([t[1:], t.new_tensor([-1])])
        else:
            prev_t = t - 1
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = torch.where(prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], self.one)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        if self.config.variance_type == "fixed_small":
            std = variance**0.5
        elif self.config.variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        else:  # fixed_large; for the learned types, the model's variance replaces it
            std = current_beta_t**0.5
        draws = t > 0  # the base step draws and adds noise only for t > 0
        return {
            "sqrt_alpha_prod": alpha_prod_t ** (0.5),
            "sqrt_beta_prod": beta_prod_t ** (0.5),
            "x0_coeff": (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
            "sample_coeff": current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t,
            "std": torch.where(draws, std, 0.0),
            "min_log": torch.log(variance),  # learned_range interpolates the log variance between these two
            "max_log": torch.log(current_beta_t),
            "draws": draws.to(alpha_prod_t.dtype),
        }

    def noise_mask(self):
        return [bool(draws) for draws in self.host_table()["draws"]]

    def split_model_output(self, model_output, sample):
        learned = self.variance_type in ("learned", "learned_range")
        if learned and model_output.shape[2] == 2 * sample.shape[2]:  # (n, B, 2C, ...), as the base step splits
            mean, variance = model_output.split(sample.shape[2], dim=2)
            return super().split_model_output(mean, sample)[0], variance
        if learned:
            raise ValueError(
                f"With variance_type={self.variance_type!r}, the model must output twice the sample's "
                f"{sample.shape[2]} channels (the second half its variance), got {model_output.shape[2]}."
            )
        return super().split_model_output(model_output, sample)

    def batch_step(self, model_output, indices, sample, noise=None):
        """`DDPMScheduler.step` for the timesteps `timesteps[indices]` at once, with its noise given as `noise`.

        Args:
            model_output: `(n, B, C, H, W)`, or `(n, B, 2C, H, W)` with learned variances.
            indices: `(n,)` positions in `timesteps`.
            sample: `(n, B, C, H, W)`, one row per step.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise` (rows of steps with `t = 0` unused);
                needed whenever the schedule has a step with `t > 0`.
        """
        model_output, predicted_variance = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample)
        x0 = clip_or_threshold(self, self._to_x0(model_output, sample, c))
        prev_sample = c["x0_coeff"] * x0 + c["sample_coeff"] * sample
        if not any(self.noise_mask()):
            return prev_sample
        self._require_noise(noise)
        if self.variance_type == "learned":
            std = predicted_variance**0.5
        elif self.variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            std = torch.exp(0.5 * (frac * c["max_log"] + (1 - frac) * c["min_log"]))
        else:
            std = c["std"]
        return prev_sample + torch.where(c["draws"] > 0, std, 0.0) * noise
