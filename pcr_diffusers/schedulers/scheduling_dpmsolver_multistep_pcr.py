"""`DPMSolverMultistepScheduler` (DPM-Solver, DPM-Solver++ and their SDE variants) with batched steps."""

import torch
from diffusers import DPMSolverMultistepScheduler

from .scheduling_pcr import PCRAlphaSigmaSchedulerMixin, StepHistory

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
COEFFICIENTS = ("a", "b0", "b1", "b2", "q0", "q1", "w", "v", "noise")


class PCRDPMSolverMultistepScheduler(PCRAlphaSigmaSchedulerMixin, DPMSolverMultistepScheduler):
    """DPM-Solver(++) multistep with `batch_step`; everything else is `DPMSolverMultistepScheduler`'s.

    A step of order `p` reads the converted model outputs `D` (x0 for the `++` algorithms, eps otherwise) of the
    `p - 1` steps before it: one update of the form

        x' = ((a x + b0 D_l) + b1 D1) + b2 D2 (+ noise_coeff xi),   D1 = D1_0 + w (D1_0 - D1_1), D2 = v (D1_0 - D1_1),
        D1_0 = q0 (D_l - D_{l-1}),   D1_1 = q1 (D_{l-1} - D_{l-2}),

    is the base's first-, second- and third-order update, with the coefficients of the other orders 0 (bitwise its
    result: `x + 0 = x`, and subtractions are additions of negated coefficients). The order of each step, lowered
    during the warm-up and at the end as the base lowers it, is the chain's plan. Supports every algorithm type,
    `solver_order` 1-3, both solver types, every sigma schedule (Karras, exponential, beta, Lu's lambdas), flow
    sigmas and `flow_prediction`, `lower_order_final`, `euler_at_final`, `final_sigmas_type`, thresholding and
    every prediction type. The SDE variants draw noise at every step, as the base does.
    """

    @property
    def history_size(self) -> int:
        return self.config.solver_order - 1

    def _check_config(self):
        config = self.config
        if config.algorithm_type not in ALGORITHMS:
            raise self._unsupported("algorithm_type", config.algorithm_type, ALGORITHMS)
        if config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", config.prediction_type, PREDICTION_TYPES)
        if config.variance_type in ("learned", "learned_range"):
            raise self._unsupported("variance_type", config.variance_type, (None,))
        if config.algorithm_type == "sde-dpmsolver" and config.solver_order == 3:  # the base fails at order 3
            raise self._unsupported("solver_order with algorithm_type='sde-dpmsolver'", 3, (1, 2))

    def _step_table(self):
        """`(3, N)` tables: row p-1 holds the coefficients of the order-p update at each position."""
        self._check_config()
        sigmas = self.sigmas.cpu()
        n = len(self.timesteps)
        rows = {name: [[torch.tensor(0.0)] * n for _ in range(3)] for name in COEFFICIENTS}
        for i in range(n):
            for order in range(1, min(self.config.solver_order, i + 1) + 1):
                for name, value in self._update_coefficients(sigmas, i, order).items():
                    rows[name][order - 1][i] = value
        table = {name: torch.stack([torch.stack(row) for row in forms]) for name, forms in rows.items()}
        alpha, sigma = self._sigma_to_alpha_sigma_t(sigmas[:-1])
        return {**table, "alpha": alpha, "sigma": sigma, "sigma_raw": sigmas[:-1]}

    def _update_coefficients(self, sigmas: torch.Tensor, i: int, order: int) -> dict[str, torch.Tensor]:
        """The base's update of `order` at position i, as the coefficients of the one form above: its own scalar
        arithmetic on 0-dim float32 tensors, step for step."""
        algorithm, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        alpha_sigma = [self._sigma_to_alpha_sigma_t(sigmas[j]) for j in (i + 1, i, i - 1, i - 2)[: order + 1]]
        lambdas = [torch.log(alpha) - torch.log(sigma) for alpha, sigma in alpha_sigma]
        (alpha_t, sigma_t), (alpha_s0, sigma_s0) = alpha_sigma[:2]
        h = lambdas[0] - lambdas[1]
        c = {}
        if algorithm == "dpmsolver++":
            c["a"], c["b0"] = sigma_t / sigma_s0, -(alpha_t * (torch.exp(-h) - 1.0))
        elif algorithm == "dpmsolver":
            c["a"], c["b0"] = alpha_t / alpha_s0, -(sigma_t * (torch.exp(h) - 1.0))
        elif algorithm == "sde-dpmsolver++":
            c["a"], c["b0"] = sigma_t / sigma_s0 * torch.exp(-h), alpha_t * (1 - torch.exp(-2.0 * h))
            c["noise"] = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:
            c["a"], c["b0"] = alpha_t / alpha_s0, -(2.0 * (sigma_t * (torch.exp(h) - 1.0)))
            c["noise"] = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        if order == 1:
            return c
        h_0 = lambdas[1] - lambdas[2]
        r0 = h_0 / h
        c["q0"] = 1.0 / r0
        if order == 2:
            c["b1"] = self._second_order_coefficient(algorithm, midpoint, alpha_t, sigma_t, h)
            return c
        h_1 = lambdas[2] - lambdas[3]
        r1 = h_1 / h
        c.update(q1=1.0 / r1, w=r0 / (r0 + r1), v=1.0 / (r0 + r1))
        if algorithm == "dpmsolver++":
            c["b1"] = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            c["b2"] = -(alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
        elif algorithm == "dpmsolver":
            c["b1"] = -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
            c["b2"] = -(sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
        else:  # sde-dpmsolver++
            c["b1"] = alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            c["b2"] = alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        return c

    @staticmethod
    def _second_order_coefficient(algorithm, midpoint, alpha_t, sigma_t, h):
        """The coefficient of `D1` in the base's second-order update (`0.5 * c * D1` parses as `(0.5 * c) * D1`)."""
        if algorithm == "dpmsolver++":
            if midpoint:
                return -(0.5 * (alpha_t * (torch.exp(-h) - 1.0)))
            return alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        if algorithm == "dpmsolver":
            if midpoint:
                return -(0.5 * (sigma_t * (torch.exp(h) - 1.0)))
            return -(sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))
        if algorithm == "sde-dpmsolver++":
            if midpoint:
                return 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))
            return alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        if midpoint:  # sde-dpmsolver
            return -(sigma_t * (torch.exp(h) - 1.0))
        return -(2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)))

    def _step_plan(self, start):
        """The order of each step, as the base decides it: lowered while fewer steps than the order have run since
        the chain started, and at the end (`lower_order_final`, `euler_at_final`, a final sigma of 0)."""
        config, n = self.config, len(self.timesteps)
        orders = [1] * n
        for i in range(start, n):
            done = min(i - start, config.solver_order)  # the base's `lower_order_nums`
            last = i == n - 1 and (
                config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
            )
            second_last = i == n - 2 and config.lower_order_final and n < 15
            if config.solver_order == 1 or done < 1 or last:
                orders[i] = 1
            elif config.solver_order == 2 or done < 2 or second_last:
                orders[i] = 2
            else:
                orders[i] = 3
        return {"form": orders}

    def noise_mask(self):
        return [self.config.algorithm_type.startswith("sde")] * len(self.timesteps)

    def noise_dtype(self, dtype):
        return torch.float32  # the base draws in float32

    def batch_convert_model_output(self, model_output, indices, sample, start=0):
        """`convert_model_output`: the x0 prediction (`++` algorithms) or the noise prediction, thresholded as the
        base does, in the model output's dtype."""
        model_output, _ = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample, start)
        prediction, noise_prediction = self.config.prediction_type, not self.config.algorithm_type.endswith("++")
        alpha, sigma = c["alpha"], c["sigma"]
        if not noise_prediction:
            x0 = self._to_x0(model_output, sample, c)
            return self._threshold(x0) if self.config.thresholding else x0
        if prediction == "epsilon":
            eps = model_output
        elif prediction == "sample":
            eps = (sample - alpha * model_output) / sigma
        else:
            eps = alpha * model_output + sigma * sample
        if self.config.thresholding:
            x0 = self._threshold((sample - sigma * eps) / alpha)
            eps = (sample - alpha * x0) / sigma
        return eps

    def _threshold(self, x0):
        return self._threshold_sample(x0.flatten(0, 1)).reshape(x0.shape)

    def _to_x0(self, model_output, sample, c):
        prediction, alpha, sigma = self.config.prediction_type, c["alpha"], c["sigma"]
        if self.config.algorithm_type.endswith("++") or prediction in ("sample", "flow_prediction"):
            return super()._to_x0(model_output, sample, c)
        eps = model_output if prediction == "epsilon" else alpha * model_output + sigma * sample
        return (sample - sigma * eps) / alpha

    def batch_step(self, model_output, indices, sample, noise=None, *, history: StepHistory | None = None, start=0):
        """`DPMSolverMultistepScheduler.step` for the positions `indices` of a chain that starts at `start`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: `(n, B, C, H, W)` standard-normal draws from `draw_noise` (SDE variants).
            history: the converted outputs of the `solver_order - 1` steps before each (`StepHistory`); needed
                for `solver_order` > 1.
            start: the chain's first position: the base lowers the order for its first steps.
        """
        converted = self.batch_convert_model_output(model_output, indices, sample, start)
        sample = sample.to(torch.float32)  # as the base; its float32 coefficients multiply in float32 here
        c = self._coefficients(indices, sample, start)
        if history is None and self.history_size:
            raise ValueError(f"`history` is needed with solver_order={self.config.solver_order}.")
        previous = [] if history is None else [history.outputs[:, j] for j in range(history.outputs.shape[1])]
        m1, m2 = (previous + [torch.zeros_like(converted)] * 2)[:2]  # unused terms get coefficient 0
        d1_0 = c["q0"] * (converted - m1)
        d1_1 = c["q1"] * (m1 - m2)
        prev_sample = c["a"] * sample + c["b0"] * converted
        prev_sample = prev_sample + c["b1"] * (d1_0 + c["w"] * (d1_0 - d1_1))
        prev_sample = prev_sample + c["b2"] * (c["v"] * (d1_0 - d1_1))
        if self.config.algorithm_type.startswith("sde"):
            self._require_noise(noise)
            prev_sample = prev_sample + c["noise"] * noise.to(torch.float32)
        return prev_sample.to(converted.dtype)
