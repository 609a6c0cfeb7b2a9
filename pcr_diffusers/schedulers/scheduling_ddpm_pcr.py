"""`DDPMScheduler` with batched steps for parallel sampling."""

import torch
from diffusers import DDPMScheduler

from .scheduling_pcr import PCRSchedulerMixin

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


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
    clipping and dynamic thresholding, and the fixed variance types `fixed_small`, `fixed_small_log` and
    `fixed_large`. Steps with `t > 0` draw noise, as in `DDPMScheduler.step`.
    """

    def _step_table(self):
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        if self.config.variance_type not in VARIANCE_TYPES:
            raise self._unsupported("variance_type", self.config.variance_type, VARIANCE_TYPES)
        # The base step's scalar arithmetic, elementwise over all timesteps at once (the same float ops, so the same
        # numbers); `previous_timestep` would scan the timesteps once per step.
        t = self.timesteps
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
        else:  # fixed_large
            std = current_beta_t**0.5
        return {
            "sqrt_alpha_prod": alpha_prod_t ** (0.5),
            "sqrt_beta_prod": beta_prod_t ** (0.5),
            "x0_coeff": (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
            "sample_coeff": current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t,
            "std": torch.where(t > 0, std, 0.0),  # the base step draws and adds noise only for t > 0
        }

    def noise_mask(self):
        return [bool(t > 0) for t in self.timesteps]

    def batch_step(self, model_output, indices, sample, noise=None):
        """`DDPMScheduler.step` for the timesteps `timesteps[indices]` at once, with its noise given as `noise`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise` (rows of steps with `t = 0` unused).
        """
        self._check_ready(model_output, sample)
        c = self._coefficients(indices, sample)
        x0 = clip_or_threshold(self, self._to_x0(model_output, sample, c))
        prev_sample = c["x0_coeff"] * x0 + c["sample_coeff"] * sample
        if bool((self._table["std"][indices.cpu()] != 0).any()):
            if noise is None:
                raise ValueError("These DDPM steps draw noise: pass `noise` from `draw_noise`.")
            prev_sample = prev_sample + c["std"] * noise
        return prev_sample
