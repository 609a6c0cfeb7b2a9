"""`EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` with batched steps for parallel sampling."""

import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from .scheduling_pcr import PCRSchedulerMixin, per_step


class _SigmaMixin(PCRSchedulerMixin):
    """Input scaling and state size shared by the variance-exploding (sigma) schedulers."""

    def batch_scale_model_input(self, sample, indices):
        return sample / per_step(self.step_table(indices.device)["input_scale"], indices, sample).to(sample.dtype)

    def _sigma_table(self):
        """The base step's scalar arithmetic on its sigmas, elementwise over all steps (the same float ops)."""
        sigmas = self.sigmas.cpu()
        sigma = sigmas[:-1]
        return {
            "sigma": sigma,
            "v_out": -sigma / (sigma**2 + 1) ** 0.5,
            "v_in": sigma**2 + 1,
            "input_scale": (sigma**2 + 1) ** 0.5,
            "state_scale": (sigmas[1:].double() ** 2 + 1) ** 0.5,
        }

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
        table = self._sigma_table()
        sigma_hat = table["sigma"] * (0.0 + 1)  # the base step's `sigma * (gamma + 1)` without churn
        return {**table, "sigma": sigma_hat, "dt": self.sigmas.cpu()[1:] - sigma_hat}

    def batch_step(self, model_output, indices, sample, noise=None):
        """`EulerDiscreteScheduler.step` (no churn) for the timesteps `timesteps[indices]` at once.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the unscaled state.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (these steps draw none); accepted for a uniform signature.
        """
        model_output, _ = self.split_model_output(model_output, sample)
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
        table = self._sigma_table()
        sigma_from, sigma_to = table["sigma"], self.sigmas.cpu()[1:]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return {**table, "dt": sigma_down - sigma_from, "sigma_up": sigma_up}

    def noise_mask(self):
        return [True] * len(self.timesteps)

    def batch_step(self, model_output, indices, sample, noise=None):
        """`EulerAncestralDiscreteScheduler.step` for the timesteps `timesteps[indices]` at once.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the unscaled state.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise`.
        """
        model_output, _ = self.split_model_output(model_output, sample)
        self._require_noise(noise)
        sample = sample.to(torch.float32)
        c = self._coefficients(indices, sample)
        x0 = self._to_x0(model_output, sample, c)
        derivative = (sample - x0) / c["sigma"]
        prev_sample = sample + derivative * c["dt"]
        prev_sample = prev_sample + noise * c["sigma_up"]
        return prev_sample.to(model_output.dtype)
