"""`FlowMatchEulerDiscreteScheduler` with batched steps for parallel sampling."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from .scheduling_pcr import PCRSchedulerMixin


class PCRFlowMatchEulerDiscreteScheduler(PCRSchedulerMixin, FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler (SD3, Flux) with `batch_step`; everything else is `FlowMatchEulerDiscreteScheduler`'s.

    The model predicts the velocity `v`; a step is `x + (sigma_next - sigma) v`, or with `stochastic_sampling`
    `(1 - sigma_next) (x - sigma v) + sigma_next z` with noise drawn every step. Shifted and dynamically shifted
    schedules come from the base `set_timesteps` (pass `mu=` there as the pipeline would). Per-token timesteps are
    not supported.
    """

    def _step_table(self):
        sigmas = self.sigmas.cpu()
        return {"sigma": sigmas[:-1], "sigma_next": sigmas[1:], "dt": sigmas[1:] - sigmas[:-1]}

    def _to_x0(self, model_output, sample, c):
        return sample - c["sigma"] * model_output

    def _from_x0(self, x0, sample, c):
        return (sample - x0) / c["sigma"]

    def noise_mask(self):
        return [bool(self.config.stochastic_sampling)] * len(self.timesteps)

    def noise_dtype(self, dtype):
        return torch.float32  # the base step draws like its sample, which it casts to float32

    def batch_step(self, model_output, indices, sample, noise=None):
        """`FlowMatchEulerDiscreteScheduler.step` for the timesteps `timesteps[indices]` at once.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise`; needed with `stochastic_sampling`.
        """
        model_output, _ = self.split_model_output(model_output, sample)
        sample = sample.to(torch.float32)
        c = self._coefficients(indices, sample)
        if self.config.stochastic_sampling:
            self._require_noise(noise)
            x0 = self._to_x0(model_output, sample, c)
            prev_sample = (1.0 - c["sigma_next"]) * x0 + c["sigma_next"] * noise
        else:
            prev_sample = sample + c["dt"] * model_output
        return prev_sample.to(model_output.dtype)
