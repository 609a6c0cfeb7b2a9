"""`UniPCMultistepScheduler` (UniPC: the UniP predictor and the UniC corrector, B(h) = h or e^h - 1) with batched
steps."""

import torch
from diffusers import UniPCMultistepScheduler

from .scheduling_pcr import PCRAlphaSigmaSchedulerMixin, StepHistory

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


class PCRUniPCMultistepScheduler(PCRAlphaSigmaSchedulerMixin, UniPCMultistepScheduler):
    """UniPC multistep with `batch_step`; everything else is `UniPCMultistepScheduler`'s.

    The base's `step` at chain step l reads the model output converted at its input `x_l` (`m_l`: x0 with
    `predict_x0`, else eps), corrects the sample it predicted from, `z_{l-1}` (`last_sample`), with the UniC update
    of the order `p'` of step l - 1, and predicts the next input from the corrected `z_l` with the UniP update of
    order `p`:

        z_l     = a' z_{l-1} - b' m_{l-1} - c' (sum_k rc_k D'_k + rc_last (m_l - m_{l-1}))   (corrector, l > 0)
        x_{l+1} = (a z_l - b m_l) - c sum_k rp_k D_k                                          (predictor)
        D_k = (m_{l-k} - m_l) / r_k,   D'_k = (m_{l-1-k} - m_{l-1}) / r'_k,

    where `a, b, c` are `sigma_t/sigma_s0, alpha_t h_phi_1, alpha_t B(h)` (with `predict_x0`; else `alpha_t/alpha_s0,
    sigma_t h_phi_1, sigma_t B(h)`). The model never sees `z_l`, so the chain's state is the model input `x_l`, the
    predictor's output. `z_{l-1}` is eliminated: the corrector of step l and the predictor of step l - 1 step over
    the same interval from the same `z_{l-1}` with the same history (the same `a', b', c'`, `r'_k` and `D'_k`, and
    the predictor's rhos `rp'_k`), so

        z_l = x_l - c' (rc_last (m_l - m_{l-1}) + sum_k (rc_k - rp'_k) D'_k),

    which reads the history `m_{l-1}, ..., m_{l-K}` (`K = solver_order`) and no state but `x_l`. This equals the
    base's `z_l` in exact arithmetic and up to rounding in floating point: measured over whole chains of a toy model
    (about 2,400 configurations, 1 to 25 steps), at most 5e-15 of the largest sample in float64 (2e-14 at
    `solver_order=4`) and 4e-6 in float32, i.e. tens of ulp. Steps without the corrector (the chain's first step,
    `disable_corrector`) are bit for bit the base's.

    The rhos, `r_k` and `r'_k` depend on the orders `p` and `p'`, which the base lowers during its warm-up (counted
    from the chain's first step) and at the end (`lower_order_final`): the chain's plan picks, per step, the form
    `(p, p')` (`p' = 0`: no corrector) of `(forms, N)` tables; unused rhos are 0 and unused `r_k` 1.

    Supports `solver_type` bh1 and bh2, `predict_x0` True and False, `disable_corrector`, every `solver_order`,
    `lower_order_final`, every prediction type (`flow_prediction` with `predict_x0`) and sigma schedule (Karras,
    exponential, beta, flow sigmas), and thresholding. Refuses `solver_p` and the configurations where diffusers'
    own `step` returns NaN or inf at the last step (see `_check_config`).
    """

    @property
    def history_size(self) -> int:
        return self.config.solver_order

    def _check_config(self, sigmas: torch.Tensor):
        """Refuses `solver_p` (an arbitrary scheduler as the predictor), and the configurations where diffusers' own
        `step` breaks at the last step: a final sigma of 0 makes the last log-SNR step `h` infinite (bh1's
        `B(h) = h` times 0, `sigma_t (e^h - 1)` = 0 * inf with `predict_x0=False`, and `r_k = 0` above the first
        order), a repeated final sigma makes it 0 (the third-order rhos are 0/0)."""
        config = self.config
        if self.solver_p is not None:
            raise self._unsupported("solver_p", type(self.solver_p).__name__, (None,))
        allowed = PREDICTION_TYPES if self.predict_x0 else PREDICTION_TYPES[:3]
        if config.prediction_type not in allowed:
            raise self._unsupported(
                f"prediction_type with predict_x0={self.predict_x0}", config.prediction_type, allowed
            )
        zero = "final_sigmas_type='zero'"
        if config.final_sigmas_type == "zero" and config.solver_type == "bh1":
            raise self._broken(f"solver_type with {zero}", "bh1", ("bh2",), "returns NaN")
        if config.final_sigmas_type == "zero" and not self.predict_x0:
            raise self._broken(f"predict_x0 with {zero}", False, (True,), "returns NaN")
        if config.final_sigmas_type == "zero" and not config.lower_order_final and config.solver_order > 1:
            raise self._broken(f"lower_order_final with {zero} and solver_order > 1", False, (True,), "returns inf")
        if not config.lower_order_final and config.solver_order > 2 and sigmas[-1] == sigmas[-2]:
            raise self._broken(
                "lower_order_final with solver_order > 2 and a repeated final sigma (final_sigmas_type='sigma_min' "
                "with Karras, exponential, beta or flow sigmas)",
                False,
                (True,),
                "returns NaN",
            )

    def _broken(self, option: str, value, allowed, outcome: str) -> ValueError:
        return ValueError(
            f"{self._unsupported(option, value, allowed)} diffusers' own `step` {outcome} at its last step."
        )

    def _step_table(self):
        """1-D tables `(N,)`: the conversion's `alpha`, `sigma`, `sigma_raw`; the predictor's `p_a, p_b, p_c` at
        position i and the corrector's `c_c` (the predictor's `p_c` of position i - 1). `(forms, N)` tables, form
        `(p - 1) (K + 1) + p'` (0-based): the predictor's `p_rk{k}, p_rho{k}` of order p at position i, the
        corrector's `c_last, c_rk{k}, c_rho{k}` and the rhos `cp_rho{k}` of the predictor it shares its interval
        with, of order p' at position i (those of the update of order p' at position i - 1)."""
        sigmas = self.sigmas.cpu()
        self._check_config(sigmas)
        config, n = self.config, len(self.timesteps)
        order, lags = config.solver_order, config.solver_order - 1
        updates = {  # (position, order): the base's scalars; only the orders a chain can reach there
            (i, p): self._update_coefficients(sigmas, i, p) for i in range(n) for p in range(1, self._cap(i) + 1)
        }
        forms = order * (order + 1)
        names = [f"{kind}{k}" for kind in ("p_rk", "p_rho", "c_rk", "c_rho", "cp_rho") for k in range(lags)]
        rows = {name: [[1.0 if "rk" in name else 0.0] * n for _ in range(forms)] for name in [*names, "c_last"]}
        for (i, p), update in updates.items():
            for corrector in range(order + 1):
                form = (p - 1) * (order + 1) + corrector
                for k in range(p - 1):
                    rows[f"p_rk{k}"][form][i] = update["rks"][k]
                    rows[f"p_rho{k}"][form][i] = update["rhos_p"][k]
        for (i, p), update in updates.items():  # the corrector of order p at position i + 1
            if i + 1 >= n:
                continue
            for predictor in range(1, order + 1):
                form = (predictor - 1) * (order + 1) + p
                rows["c_last"][form][i + 1] = update["rhos_c"][-1]
                for k in range(p - 1):
                    rows[f"c_rk{k}"][form][i + 1] = update["rks"][k]
                    rows[f"c_rho{k}"][form][i + 1] = update["rhos_c"][k]
                    rows[f"cp_rho{k}"][form][i + 1] = update["rhos_p"][k]
        table = {name: torch.tensor(values, dtype=torch.float32) for name, values in rows.items()}
        for name in ("a", "b", "c"):
            table[f"p_{name}"] = torch.tensor([updates[i, 1][name] for i in range(n)], dtype=torch.float32)
        table["c_c"] = torch.tensor([0.0] + [updates[i, 1]["c"] for i in range(n - 1)], dtype=torch.float32)
        alpha, sigma = self._sigma_to_alpha_sigma_t(sigmas[:-1])
        return {**table, "alpha": alpha, "sigma": sigma, "sigma_raw": sigmas[:-1]}

    def _cap(self, i: int) -> int:
        """The highest order the base may use at position i (`lower_order_final`, and the steps before i)."""
        n, order = len(self.timesteps), self.config.solver_order
        return min(order, n - i, i + 1) if self.config.lower_order_final else min(order, i + 1)

    def _update_coefficients(self, sigmas: torch.Tensor, i: int, order: int) -> dict:
        """`multistep_uni_p_bh_update`'s scalars of `order` at position i (from `sigmas[i]` to `sigmas[i + 1]`), its
        own arithmetic on 0-dim float32 tensors, step for step; and the rhos of `multistep_uni_c_bh_update` of
        `order` at position i + 1, which steps over the same interval with the same `r_k` and `b`. Python floats
        (exactly the float32 values)."""
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigmas[i + 1])
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        rks = []
        for k in range(1, order):
            alpha_si, sigma_si = self._sigma_to_alpha_sigma_t(sigmas[i - k])
            lambda_si = torch.log(alpha_si) - torch.log(sigma_si)
            rks.append((lambda_si - lambda_s0) / h)
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        powers = torch.stack([*rks, torch.ones(())])
        R, b = [], []
        for k in range(1, order + 1):
            R.append(torch.pow(powers, k - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.stack(b)
        if order == 1:
            rhos_p, rhos_c = [], [0.5]
        else:
            rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            rhos_c = torch.linalg.solve(R, b).tolist() if i + 1 < len(self.timesteps) else [0.0] * order
        scale = alpha_t if self.predict_x0 else sigma_t
        a = sigma_t / sigma_s0 if self.predict_x0 else alpha_t / alpha_s0
        return {
            "a": a.item(),
            "b": (scale * h_phi_1).item(),
            "c": (scale * b_h).item(),
            "rks": [rk.item() for rk in rks],
            "rhos_p": rhos_p,
            "rhos_c": rhos_c,
        }

    def _step_plan(self, start):
        """Per step the form `(p, p')`: the predictor's order `p`, as the base decides it (`this_order`: lowered
        while fewer steps than the order have run since the chain started, and by `lower_order_final` at the end),
        and the corrector's `p'`, the order of the step before (0 at the chain's first step and after a step in
        `disable_corrector`)."""
        config, n = self.config, len(self.timesteps)
        orders, forms = [1] * n, [1] * n
        for i in range(start, n):
            cap = min(config.solver_order, n - i) if config.lower_order_final else config.solver_order
            orders[i] = min(cap, min(i - start, config.solver_order) + 1)  # the base's `lower_order_nums` + 1
            corrector = 0 if i == start or i - 1 in self.disable_corrector else orders[i - 1]
            forms[i] = (orders[i] - 1) * (config.solver_order + 1) + corrector + 1
        return {"form": forms}

    def batch_convert_model_output(self, model_output, indices, sample, start=0):
        """`convert_model_output`: the x0 prediction, thresholded as the base does (`predict_x0`), or the noise
        prediction, in the model output's dtype."""
        model_output, _ = self.split_model_output(model_output, sample)
        c = self._coefficients(indices, sample, start)
        if self.predict_x0:
            x0 = self._to_x0(model_output, sample, c)
            return self._threshold(x0) if self.config.thresholding else x0
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "sample":
            return (sample - c["alpha"] * model_output) / c["sigma"]
        return c["alpha"] * model_output + c["sigma"] * sample

    def _threshold(self, x0):
        return self._threshold_sample(x0.flatten(0, 1)).reshape(x0.shape)

    def batch_step(self, model_output, indices, sample, noise=None, *, history: StepHistory | None = None, start=0):
        """`UniPCMultistepScheduler.step` (corrector, then predictor) for the positions `indices` of a chain that
        starts at `start`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step; `sample` is the model's input `x_l`.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (UniPC draws nothing).
            history: the converted outputs of the `solver_order` steps before each (`StepHistory`).
            start: the chain's first position: the base lowers the order for its first steps and does not
                correct the first.
        """
        if history is None:
            raise ValueError(f"`history` is needed by {type(self).__name__}.batch_step (solver_order steps).")
        converted = self.batch_convert_model_output(model_output, indices, sample, start)
        c = self._coefficients(indices, sample, start)
        previous = history.outputs  # (n, K, B, C, H, W): m_{l-1}, ..., m_{l-K}
        m1 = previous[:, 0]
        # the corrected sample z_l, with last_sample eliminated (class docstring); rhos subtracted in the state dtype
        correction = c["c_last"] * (converted - m1)
        for k in range(self.config.solver_order - 1):
            rho = c[f"c_rho{k}"] - c[f"cp_rho{k}"]
            correction = correction + rho * ((previous[:, k + 1] - m1) / c[f"c_rk{k}"])
        corrected = sample - c["c_c"] * correction
        prev_sample = c["p_a"] * corrected - c["p_b"] * converted
        if self.config.solver_order > 1:
            lags = range(self.config.solver_order - 1)
            d1s = torch.stack([(previous[:, k] - converted) / c[f"p_rk{k}"] for k in lags], dim=2)  # (n, B, K-1, ...)
            rhos = torch.cat([c[f"p_rho{k}"].reshape(-1, 1) for k in lags], dim=1)  # (n, K-1)
            prediction = torch.einsum("nk,nbkc...->nbc...", rhos, d1s)  # the base's einsum, one step per row
            prev_sample = prev_sample - c["p_c"] * prediction
        return prev_sample.to(sample.dtype)
