"""`DDIMScheduler` with batched steps for parallel sampling, `eta > 0` included."""

import torch
from diffusers import DDIMScheduler

from .scheduling_ddpm_pcr import PREDICTION_TYPES, VPConversionsMixin, clip_or_threshold
from .scheduling_pcr import PCRSchedulerMixin


class PCRDDIMScheduler(VPConversionsMixin, PCRSchedulerMixin, DDIMScheduler):
    """DDIM with `batch_step`; everything else is `DDIMScheduler`'s.

    Deterministic for `eta = 0`; for `eta > 0` every step draws noise, as in `DDIMScheduler.step`, and the noise is
    drawn up front by `draw_noise(..., eta=eta)`. Supports every timestep spacing, the prediction types `epsilon`,
    `sample` and `v_prediction`, clipping, dynamic thresholding and `use_clipped_model_output`.
    """

    def _step_table(self):
        if self.num_inference_steps is None:  # the base step refuses too
            raise RuntimeError(f"Call `set_timesteps` on the {type(self).__name__} before its batched steps.")
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        # The base step's scalar arithmetic, elementwise over all timesteps at once (the same float ops), on the CPU.
        t = self.timesteps.cpu()
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = torch.where(
            prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return {
            "sqrt_alpha_prod": alpha_prod_t ** (0.5),
            "sqrt_beta_prod": beta_prod_t ** (0.5),
            "alpha_prod_prev": alpha_prod_t_prev,
            "sqrt_alpha_prod_prev": alpha_prod_t_prev ** (0.5),
            "variance": (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev),
        }

    def noise_mask(self, eta: float = 0.0, use_clipped_model_output: bool = False):
        return [eta > 0] * len(self.timesteps)

    def batch_step(self, model_output, indices, sample, noise=None, eta=0.0, use_clipped_model_output=False):
        """`DDIMScheduler.step` for the timesteps `timesteps[indices]` at once, with its noise given as `noise`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise(..., eta=eta)`; needed when `eta > 0`.
            eta, use_clipped_model_output: as in `DDIMScheduler.step`.
        """
        model_output, _ = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample)
        sqrt_alpha, sqrt_beta = c["sqrt_alpha_prod"], c["sqrt_beta_prod"]
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sqrt_beta * model_output) / sqrt_alpha
            eps = model_output
        elif self.config.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        else:
            x0 = sqrt_alpha * sample - sqrt_beta * model_output
            eps = sqrt_alpha * model_output + sqrt_beta * sample
        x0 = clip_or_threshold(self, x0)
        std_dev_t = eta * c["variance"] ** (0.5)
        if use_clipped_model_output:
            eps = (sample - sqrt_alpha * x0) / sqrt_beta
        direction = (1 - c["alpha_prod_prev"] - std_dev_t**2) ** (0.5) * eps
        prev_sample = c["sqrt_alpha_prod_prev"] * x0 + direction
        if eta > 0:
            self._require_noise(noise)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample
