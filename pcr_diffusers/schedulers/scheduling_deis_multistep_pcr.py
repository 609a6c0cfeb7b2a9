"""`DEISMultistepScheduler` (DEIS, log-rho multistep) with batched steps."""

import numpy as np
import torch
from diffusers import DEISMultistepScheduler

from .scheduling_pcr import PCRAlphaSigmaSchedulerMixin, StepHistory

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
COEFFICIENTS = ("first", "a", "b", "alpha_t", "alpha_s0", "c1", "c2", "c3")


def _log(value: torch.Tensor) -> torch.Tensor:
    """`np.log` of a 0-dim float32 tensor as the base takes it (numpy's float32 log), as a tensor."""
    return torch.as_tensor(np.log(value.numpy()))


class PCRDEISMultistepScheduler(PCRAlphaSigmaSchedulerMixin, DEISMultistepScheduler):
    """DEIS multistep with `batch_step`; everything else is `DEISMultistepScheduler`'s.

    A step reads the noise predictions `eps` (the model output converted to x0, thresholded, and back) of the steps
    before it. The base's first-order update and its second- and third-order ones differ in form:

        order 1:     x' = a x - b eps_l,   a = alpha_t / alpha_s0,   b = sigma_t (e^h - 1),
        order 2, 3:  x' = alpha_t (((x / alpha_s0 + c1 eps_l) + c2 eps_{l-1}) + c3 eps_{l-2}),   c3 = 0 at order 2,

    so each row takes both, with the coefficients of the other form set to finite fillers, and keeps its own
    (`first` = 1 for order 1): bit for bit the base's result. `c_k` are the base's log-rho quadrature weights, from
    the same 0-dim float32 torch and numpy operations. The order of each step, lowered during the warm-up and (for
    fewer than 15 steps, `lower_order_final`) at the end as the base lowers it, is the chain's plan.

    Supports every `solver_order` (orders above 3 step at order 3, as the base does), `lower_order_final`, every
    prediction type and sigma schedule (Karras, exponential, beta, flow sigmas), and thresholding.
    """

    @property
    def history_size(self) -> int:
        return min(self.config.solver_order, 3) - 1

    def _check_config(self):
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)

    def _step_table(self):
        """`(3, N)` tables: row p-1 holds the coefficients of the order-p update at each position."""
        self._check_config()
        sigmas = self.sigmas.cpu()
        n = len(self.timesteps)
        fillers = {"alpha_s0": 1.0}  # a finite division in the unused form
        rows = {name: [[fillers.get(name, 0.0)] * n for _ in range(3)] for name in COEFFICIENTS}
        for i in range(n):
            for order in range(1, min(self.config.solver_order, 3, i + 1) + 1):
                for name, value in self._update_coefficients(sigmas, i, order).items():
                    rows[name][order - 1][i] = value
        table = {name: torch.tensor(forms, dtype=torch.float32) for name, forms in rows.items()}
        alpha, sigma = self._sigma_to_alpha_sigma_t(sigmas[:-1])
        return {**table, "alpha": alpha, "sigma": sigma, "sigma_raw": sigmas[:-1]}

    def _update_coefficients(self, sigmas: torch.Tensor, i: int, order: int) -> dict[str, float]:
        """The base's update of `order` at position i: its own scalar arithmetic on 0-dim float32 tensors, step for
        step, as Python floats (exactly the float32 values)."""
        alpha_sigma = [self._sigma_to_alpha_sigma_t(sigmas[j]) for j in (i + 1, i, i - 1, i - 2)[: order + 1]]
        (alpha_t, sigma_t), (alpha_s0, sigma_s0) = alpha_sigma[:2]
        if order == 1:
            h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s0) - torch.log(sigma_s0))
            return {"first": 1.0, "a": (alpha_t / alpha_s0).item(), "b": (sigma_t * (torch.exp(h) - 1.0)).item()}
        rhos = [sigma / alpha for alpha, sigma in alpha_sigma]
        logs = [_log(rho) for rho in rhos]  # the base takes `np.log` of each anew: the same values
        weight = self._weight
        if order == 2:
            (rho_t, rho_s0, _), (t, s0, s1) = rhos, logs
            coefficients = (
                weight(rho_t, t, s0, s1) - weight(rho_s0, s0, s0, s1),
                weight(rho_t, t, s1, s0) - weight(rho_s0, s0, s1, s0),
            )
        else:
            (rho_t, rho_s0, _, _), (t, s0, s1, s2) = rhos, logs
            coefficients = (
                weight(rho_t, t, s0, s1, s2) - weight(rho_s0, s0, s0, s1, s2),
                weight(rho_t, t, s1, s2, s0) - weight(rho_s0, s0, s1, s2, s0),
                weight(rho_t, t, s2, s0, s1) - weight(rho_s0, s0, s2, s0, s1),
            )
        weights = {f"c{k + 1}": value.item() for k, value in enumerate(coefficients)}
        return {"alpha_t": alpha_t.item(), "alpha_s0": alpha_s0.item(), **weights}

    @staticmethod
    def _weight(t, log_t, log_b, log_c, log_d=None):
        """The base's `ind_fn(t, b, c)` of its second-order update (`log_d` None) or `ind_fn(t, b, c, d)` of its
        third-order one, given `t` and the logs of its arguments."""
        if log_d is None:
            return t * (-log_c + log_t - 1) / (log_b - log_c)
        numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
        return numerator / ((log_b - log_c) * (log_b - log_d))

    def _step_plan(self, start):
        """The order of each step, as the base decides it: lowered while fewer steps than the order have run since
        the chain started, and at the last two steps with `lower_order_final` and fewer than 15 steps."""
        config, n = self.config, len(self.timesteps)
        orders = [1] * n
        for i in range(start, n):
            done = min(i - start, config.solver_order)  # the base's `lower_order_nums`
            final = config.lower_order_final and n < 15
            if config.solver_order == 1 or done < 1 or (final and i == n - 1):
                orders[i] = 1
            elif config.solver_order == 2 or done < 2 or (final and i == n - 2):
                orders[i] = 2
            else:
                orders[i] = 3
        return {"form": orders}

    def batch_convert_model_output(self, model_output, indices, sample, start=0):
        """`convert_model_output`: the noise prediction of the (thresholded) x0 prediction, in the model output's
        dtype. With `flow_prediction` the base divides by the raw sigma, as here."""
        model_output, _ = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample, start)
        x0 = self._to_x0(model_output, sample, c)
        if self.config.thresholding:
            x0 = self._threshold_sample(x0.flatten(0, 1)).reshape(x0.shape)
        sigma = c["sigma_raw"] if self.config.prediction_type == "flow_prediction" else c["sigma"]
        return (sample - c["alpha"] * x0) / sigma

    def batch_step(self, model_output, indices, sample, noise=None, *, history: StepHistory | None = None, start=0):
        """`DEISMultistepScheduler.step` for the positions `indices` of a chain that starts at `start`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (DEIS draws nothing).
            history: the converted outputs of the `min(solver_order, 3) - 1` steps before each (`StepHistory`);
                needed for `solver_order` > 1.
            start: the chain's first position: the base lowers the order for its first steps.
        """
        if history is None and self.history_size:
            raise ValueError(f"`history` is needed with solver_order={self.config.solver_order}.")
        converted = self.batch_convert_model_output(model_output, indices, sample, start)
        c = self._coefficients(indices, sample, start)
        previous = [] if history is None else list(history.outputs.unbind(1))
        m1, m2 = (previous + [torch.zeros_like(converted)] * 2)[:2]  # unused terms get coefficient 0
        first = c["a"] * sample - c["b"] * converted
        multistep = sample / c["alpha_s0"] + c["c1"] * converted
        multistep = c["alpha_t"] * ((multistep + c["c2"] * m1) + c["c3"] * m2)
        return torch.where(c["first"] > 0, first, multistep)
