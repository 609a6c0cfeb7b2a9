"""`PNDMScheduler` (PLMS, with or without its Runge-Kutta warm-up) with batched steps."""

import torch
from diffusers import PNDMScheduler

from .scheduling_ddpm_pcr import VPConversionsMixin
from .scheduling_pcr import PCRSchedulerMixin, StepHistory

PREDICTION_TYPES = ("epsilon", "v_prediction")
UPDATE = ("sample_coeff", "output_coeff", "denom", "v_alpha", "v_sigma")
# How each form of the step combines the raw model outputs E_0..E_3 it reads (at the plan's lags `lag0`..`lag3`):
#     m = ((((w0 E_0 - w1 E_1) + w2 E_2) - w3 E_3) * mul) / div,
# the base's own operations in its order (`x - 0 E = x`, `x * 1 = x / 1 = x`, and a negated weight makes a
# subtraction the base's addition, exactly). PRK calls 4k..4k+2 use their own output; call 4k+3 accumulates
# `cur_model_output` from the oldest output on.
WEIGHTS = ("w0", "w1", "w2", "w3", "mul", "div")
FORMS = {
    "first": (1, 0, 0, 0, 1, 1),  # PLMS call 0: e_0
    "restep": (1, -1, 0, 0, 1, 2),  # call 1, from call 0's state: (e_1 + e_0) / 2
    "plms2": (3, 1, 0, 0, 1, 2),  # (3 e_l - e_{l-2}) / 2 (e_1 never enters `ets`)
    "plms3": (23, 16, 5, 0, 1, 12),
    "plms4": (55, 59, 37, 9, 1 / 24, 1),
    **{f"prk{c}": (1, 0, 0, 0, 1, 1) if c % 4 != 3 else (1 / 6, -1 / 3, 1 / 3, -1 / 6, 1, 1) for c in range(12)},
}


class PCRPNDMScheduler(VPConversionsMixin, PCRSchedulerMixin, PNDMScheduler):
    """PNDM with `batch_step`; everything else is `PNDMScheduler`'s.

    Every model call is a chain step, so with `skip_prk_steps=True` (Stable Diffusion 1.x) the chain has the N + 1
    steps of `timesteps` (the second timestep repeated), and without it 12 Runge-Kutta calls come first. Each step
    is the base's formula (9),

        x' = sample_coeff * s - (output_coeff * m) / denom,

    at the timesteps `(t, t - r)` of its position, `r = num_train_timesteps // N` (call 1 re-steps `(t + r, t)`, PRK
    calls use their Runge-Kutta step's first timestep), where `m` combines raw model outputs of this and earlier steps
    (`ets`, see `FORMS`) and `s` is this step's input or, for call 1 and the PRK calls, the input of the call that
    began the (Runge-Kutta) step: the history's samples. `v_prediction` converts `m` with `s` after the combination,
    as the base does. Which form, lags and timesteps a step takes follows the base's `counter`, the calls since
    `set_timesteps`: a chain that starts mid-schedule (SD's img2img loops over `timesteps[t_start:]`; PNDM has no
    begin index) warms up from its first step, as the base does. Prediction types `epsilon` and `v_prediction`.
    """

    @property
    def history_size(self) -> int:
        # skip_prk_steps: call 4 reads e_0; otherwise the first PLMS call (12) reads e_0, e_4, e_8
        return 4 if self.config.skip_prk_steps else 12

    def _check_config(self):
        if self.num_inference_steps is None:  # the base step refuses too
            raise RuntimeError(f"Call `set_timesteps` on the {type(self).__name__} before its batched steps.")
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise self._unsupported("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        last = int(self.timesteps.max())
        if last >= self.config.num_train_timesteps:  # e.g. N = num_train_timesteps with a `steps_offset`
            raise ValueError(
                f"{type(self).__name__}'s timesteps reach {last} >= `num_train_timesteps`="
                f"{self.config.num_train_timesteps}, where `PNDMScheduler.step` fails too (IndexError)."
            )

    def _forms(self) -> list[str]:
        prk = 0 if self.config.skip_prk_steps else len(self.prk_timesteps)
        return list(FORMS)[: 5 + prk]

    def _form_timesteps(self, form: str, t: int) -> tuple[int, int]:
        """The base's `(timestep, prev_timestep)` for a step of `form` at a position whose timestep is t."""
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        if form == "restep":
            return t + ratio, t
        if form.startswith("prk"):
            counter = int(form[3:])
            return int(self.prk_timesteps[counter // 4 * 4]), t - (0 if counter % 2 else ratio // 2)
        return t, t - ratio

    def _update_coefficients(self, t: int, prev_t: int) -> dict[str, torch.Tensor]:
        """`_get_prev_sample`'s scalar arithmetic, on the same 0-dim float32 tensors."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return {
            "sample_coeff": (alpha_prod_t_prev / alpha_prod_t) ** (0.5),
            "output_coeff": alpha_prod_t_prev - alpha_prod_t,
            "denom": alpha_prod_t * beta_prod_t_prev ** (0.5)
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5),
            "v_alpha": alpha_prod_t**0.5,
            "v_sigma": beta_prod_t**0.5,
        }

    def _step_table(self):
        """`(forms, N)` tables: row f holds, at each position, the update of form f (`FORMS`, `_forms()`), and
        `(N,)` tables the model's own `sqrt(alpha_prod)`, `sqrt(1 - alpha_prod)` at `timesteps` (for x0)."""
        self._check_config()
        timesteps, forms = self.timesteps.tolist(), self._forms()
        n = len(timesteps)
        rows = {name: [[torch.tensor(0.0)] * n for _ in forms] for name in UPDATE}
        computed = {}  # the forms share their (t, prev_t) pairs
        for f, form in enumerate(forms):
            for i in range(n):
                t, prev_t = self._form_timesteps(form, timesteps[i])
                if t >= self.config.num_train_timesteps:  # only a re-step at position 0, which no chain takes
                    continue
                if (t, prev_t) not in computed:
                    computed[t, prev_t] = self._update_coefficients(t, prev_t)
                for name, value in computed[t, prev_t].items():
                    rows[name][f][i] = value
        table = {name: torch.stack([torch.stack(row) for row in form_rows]) for name, form_rows in rows.items()}
        weights = torch.tensor([FORMS[form] for form in forms], dtype=torch.float64)  # (forms, 6)
        table.update({name: weights[:, j, None].repeat(1, n) for j, name in enumerate(WEIGHTS)})
        alpha_prod = self.alphas_cumprod[self.timesteps.cpu()]
        return {**table, "sqrt_alpha_prod": alpha_prod**0.5, "sqrt_beta_prod": (1 - alpha_prod) ** 0.5}

    def _step_plan(self, start):
        """Per position, from the base's `counter` (calls since `set_timesteps`, so `i - start`): the form, the lag
        of the step's sample (`sample_lag`: the call that began its Runge-Kutta step, or call 0 for call 1) and the
        lags of the outputs its form reads (`lag0`..`lag3`, 0: its own), following the base's `ets`."""
        n, forms = len(self.timesteps), self._forms()
        prk = len(forms) - 5
        plan = {name: [0] * n for name in ("sample_lag", "lag0", "lag1", "lag2", "lag3")}
        plan["form"] = [1] * n
        ets = []  # the counters whose model outputs the base's `ets` holds
        for i in range(start, n):
            counter = i - start
            if counter < prk:
                form, first = f"prk{counter}", counter - counter % 4
                reads = [first, first + 1, first + 2, counter] if counter % 4 == 3 else [counter]
                ets += [counter] if counter == first else []
                plan["sample_lag"][i] = counter - first
            elif counter == 1:  # the base appends nothing and re-steps from call 0's sample
                form, reads = "restep", [counter, ets[-1]]
                plan["sample_lag"][i] = 1
            else:
                ets = ets[-3:] + [counter]
                form, reads = ("first", "plms2", "plms3", "plms4")[len(ets) - 1], ets[::-1]
            plan["form"][i] = forms.index(form) + 1
            for k, read in enumerate(reads):
                plan[f"lag{k}"][i] = counter - read
        return plan

    def batch_convert_model_output(self, model_output, indices, sample, start=0):
        """The raw model output: the base's `ets` holds it unconverted (v_prediction converts after combining)."""
        model_output, _ = self.split_model_output(model_output, sample)
        return model_output

    def batch_step(self, model_output, indices, sample, noise=None, *, history: StepHistory, start: int = 0):
        """`PNDMScheduler.step` for the positions `indices` of a chain that starts at `start`.

        Args:
            model_output, sample: `(n, B, C, H, W)`, one row per step.
            indices: `(n,)` positions in `timesteps`.
            noise: unused (these steps draw none); accepted for a uniform signature.
            history: the inputs and raw outputs of the `history_size` steps before each (`StepHistory`).
            start: the chain's first position, where the base's `counter` is 0.
        """
        model_output = self.batch_convert_model_output(model_output, indices, sample, start)
        c = self._coefficients(indices, sample, start)
        plan = self.plan_table(start, indices.device)
        rows = torch.arange(len(indices), device=indices.device)
        outputs = torch.cat([model_output.unsqueeze(1), history.outputs], dim=1)  # (n, 1 + K, B, C, H, W), lag 0 first
        samples = torch.cat([sample.unsqueeze(1), history.samples], dim=1)
        e = [outputs[rows, plan[f"lag{k}"][indices]] for k in range(4)]  # (n, B, C, H, W) each
        combined = c["w0"] * e[0] - c["w1"] * e[1] + c["w2"] * e[2] - c["w3"] * e[3]
        combined = combined * c["mul"] / c["div"]
        sample = samples[rows, plan["sample_lag"][indices]]
        if self.config.prediction_type == "v_prediction":
            combined = c["v_alpha"] * combined + c["v_sigma"] * sample
        return c["sample_coeff"] * sample - c["output_coeff"] * combined / c["denom"]
