"""`EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` with batched steps for parallel sampling."""

import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from .scheduling_pcr import PCRSchedulerMixin, per_step


class _SigmaMixin(PCRSchedulerMixin):
    """Input scaling and state size shared by the variance-exploding (sigma) schedulers."""

    def batch_scale_model_input(self, sample, indices):
        return sample / per_step(self._table["input_scale"], indices, sample).to(sample.dtype)

    def state_scale(self, indices):
        return (self.sigmas[indices.cpu() + 1].double() ** 2 + 1) ** 0.5

    def _to_x0(self, model_output, sample, c):
        if self.config.prediction_type == "epsilon":
            return sample - c["sigma"] * model_output
        if self.config.prediction_type == "v_prediction":
            return model_output * c["v_out"] + (sample / c["v_in"])
        return model_output

    def _from_x0(self, x0, sample, c):
        if self.config.prediction_type == "epsilon":
            return (sample - x0) / c["sigma"]
        if self.config.prediction_type == "v_prediction":
            return (x0 - sample / c["v_in"]) / c["v_out"]
        return x0


class PCREulerDiscreteScheduler(_SigmaMixin, EulerDiscreteScheduler):
    """Euler (Karras et al.) with `batch_step`; everything else is `EulerDiscreteScheduler`'s.

    Supports its sigma schedules (Karras, exponential, beta) and timestep spacings, and the prediction types
    `epsilon`, `v_prediction` and `sample`. Stochastic churn (`s_churn > 0`) is not supported: the pipelines never
    pass it, and `batch_step` takes no churn arguments.
    """

    def _step_table(self):
        prediction_types = ("epsilon", "v_prediction", "sample", "original_sample")
        if self.config.prediction_type not in prediction_types:
            raise self._unsupported("prediction_type", self.config.prediction_type, prediction_types)
        rows = []
        for i in range(len(self.timesteps)):
            sigma = self.sigmas[i]
            sigma_hat = sigma * (0.0 + 1)
            rows.append(
                [
                    sigma_hat,
                    self.sigmas[i + 1] - sigma_hat,
                    -sigma / (sigma**2 + 1) ** 0.5,
                    sigma**2 + 1,
                    (sigma**2 + 1) ** 0.5,
                ]
            )
        names = ("sigma", "dt", "v_out", "v_in", "input_scale")
        return {name: torch.stack([row[i] for row in rows]) for i, name in enumerate(names)}

    def batch_step(self, model_output, indices, sample, noise=None):
        """`EulerDiscreteScheduler.step` (no churn) for the timesteps `timesteps[indices]` at once.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the unscaled state.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (these steps draw none); accepted for a uniform signature.
        """
        self._check_ready(model_output, sample)
        sample = sample.to(torch.float32)
        c = self._coefficients(indices, sample)
        x0 = self._to_x0(model_output, sample, c)
        derivative = (sample - x0) / c["sigma"]
        return (sample + derivative * c["dt"]).to(model_output.dtype)


class PCREulerAncestralDiscreteScheduler(_SigmaMixin, EulerAncestralDiscreteScheduler):
    """Euler ancestral with `batch_step`; everything else is `EulerAncestralDiscreteScheduler`'s.

    Every step draws noise, as in its `step`; `draw_noise` draws it up front in the same order. Prediction types
    `epsilon` and `v_prediction` (the base scheduler has no `sample`).
    """

    def _step_table(self):
        prediction_types = ("epsilon", "v_prediction")
        if self.config.prediction_type not in prediction_types:
            raise self._unsupported("prediction_type", self.config.prediction_type, prediction_types)
        rows = []
        for i in range(len(self.timesteps)):
            sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
            sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            rows.append(
                [
                    sigma_from,
                    sigma_down - sigma_from,
                    sigma_up,
                    -sigma_from / (sigma_from**2 + 1) ** 0.5,
                    sigma_from**2 + 1,
                    (sigma_from**2 + 1) ** 0.5,
                ]
            )
        names = ("sigma", "dt", "sigma_up", "v_out", "v_in", "input_scale")
        return {name: torch.stack([row[i] for row in rows]) for i, name in enumerate(names)}

    def noise_mask(self):
        return [True] * len(self.timesteps)

    def batch_step(self, model_output, indices, sample, noise=None):
        """`EulerAncestralDiscreteScheduler.step` for the timesteps `timesteps[indices]` at once.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the unscaled state.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise`.
        """
        self._check_ready(model_output, sample)
        if noise is None:
            raise ValueError("Euler ancestral steps draw noise: pass `noise` from `draw_noise`.")
        sample = sample.to(torch.float32)
        c = self._coefficients(indices, sample)
        x0 = self._to_x0(model_output, sample, c)
        derivative = (sample - x0) / c["sigma"]
        prev_sample = sample + derivative * c["dt"]
        prev_sample = prev_sample + noise * c["sigma_up"]
        return prev_sample.to(model_output.dtype)
