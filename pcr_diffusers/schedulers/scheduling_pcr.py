"""What parallel sampling asks of a scheduler: the update of many timesteps in one vectorised call.

A PCR scheduler (a "twin") subclasses a diffusers scheduler and overrides none of its methods: its config,
`set_timesteps` (with the parent's signature, so diffusers' `retrieve_timesteps` sees `timesteps`/`sigmas`), `step`,
`scale_model_input` and everything else are the base scheduler's own, and the twin behaves as its parent wherever the
parallel path is not used. It adds, for the steps at positions `indices` of `timesteps` (a LongTensor `(n,)`), on
arrays whose first axis is those n steps and whose other axes are the pipeline's latents `(B, C, H, W)`:

- `batch_step(model_output, indices, sample, noise, **step_kwargs) -> prev_sample`: the base `step` for all n steps
  at once, `(n, B, C, H, W)`, with the step's random draw passed in as standard-normal `noise` `(n, B, C, H, W)`
  (None when no step of the schedule draws) instead of drawn. `model_output` may have more channels than `sample`
  where the base step splits them off (DDPM's learned variances).
- `draw_noise(shape, generator, device, dtype, **step_kwargs) -> (N, *shape) or None`: every draw the sequential loop
  makes after the initial latents, in the same order and from the same generator, so the parallel result equals the
  sequential one for the same seed.
- `batch_timesteps(indices)`, `batch_scale_model_input(sample, indices)` and `state_scale(indices)`.
- `batch_predict_x0(model_output, indices, sample)` and `batch_model_output_from_x0(x0, indices, sample, extra)`:
  the conversions between the model's output and its denoised prediction, which the solver's Jacobians and
  predictors use.

Multistep twins (DPM-Solver++, UniPC, PNDM, LMS, DEIS) read, besides a step's own input and model output, what
the K steps before it in the chain saw and predicted (`history_size` K > 0). The chain then stays one latent per
step (the model's input) and each step's update takes that history as a `StepHistory`: the model inputs and the
converted model outputs `D` (`batch_convert_model_output`: x0, eps, ODE derivative, ...) of the steps `l-1, ..., l-K`
of the chain, `(n, K, B, C, H, W)` each, lag 1 first, zeros before the chain's first step, which the
`DenoisingChain` keeps for every step and reads from the same batched call (steps in the window) or from the accepted
steps before it. So step l is `x_{l+1} = Phi_l(x_l, x_{l-1}, ..., x_{l-K})`, a higher-order recurrence whose fixed
point is the sequential loop's trajectory, and `batch_step(..., history=..., start=...)` reproduces the base `step`'s
arithmetic for it. What depends on where the chain starts (warm-up at lower order, which the base counts from its
first call after `set_timesteps`) is the twin's `_step_plan(start)`; tables of shape `(forms, N)` hold a coefficient
per form of the update (e.g. per order), and the plan's `"form"` picks the row for each step.

A twin provides `_step_table()`: its per-step coefficients `(N,)` over the whole schedule, computed after
`set_timesteps` with the base scheduler's own arithmetic (the same float ops, so the same numbers as its `step`), on
the CPU; `_to_x0(model_output, sample, c)` and `_from_x0(x0, sample, c)` on the model output's mean part, where `c`
maps each table name to its coefficients shaped `(n, 1, ..., 1)`; `batch_step`; and, if its steps draw noise,
`noise_mask(**step_kwargs)`. Tables are built lazily, once per `set_timesteps` and device, and indexed on the device
of `indices`: a round reads no value back to the host and copies nothing to the device. Indices are positions in the
full schedule, so a chain may start mid-way (img2img) or stop early (`denoising_end`).
"""

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor


def per_step(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gathers per-step values `(N,)` at `indices` (on their device) and shapes them `(n, 1, ..., 1)` like `like`."""
    return values[indices].reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class StepHistory:
    """What a multistep update reads of the K chain steps before each of n steps, lag 1 first (zeros before the
    chain's first step).

    Attributes:
        samples: `(n, K, B, C, H, W)`, the model inputs of steps `l-1, ..., l-K`.
        outputs: `(n, K, B, C, H, W)`, their converted model outputs (`batch_convert_model_output`).
    """

    samples: torch.Tensor
    outputs: torch.Tensor


class PCRSchedulerMixin:
    """Batched steps for a diffusers scheduler; see the module docstring for the contract."""

    history_size = 0  # K: how many chain steps before it a step reads (0: single-step schedulers)

    def _step_table(self) -> dict[str, torch.Tensor]:
        """Per-step coefficients `(N,)` on the CPU, computed with the base scheduler's arithmetic."""
        raise NotImplementedError

    def step_table(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The per-step coefficients and `"timesteps"` on `device`, built once per `set_timesteps` and device.

        Raises the twin's `ValueError` for a configuration its batched step does not reproduce (the plain `step`
        still works for it), and a `RuntimeError` where the parent's `step` needs `set_timesteps` first.
        """
        cache = getattr(self, "_pcr_tables", None)
        if cache is None or cache["timesteps"] is not self.timesteps:  # set_timesteps makes a new `timesteps`
            cache = self._pcr_tables = {"timesteps": self.timesteps}
        device = torch.device(device)
        if device not in cache:
            if "host" not in cache:
                cpu = {**self._step_table(), "timesteps": self.timesteps.cpu()}
                cache[torch.device("cpu")] = cpu
                cache["host"] = {name: values.tolist() for name, values in cpu.items()}
            cache[device] = {name: values.to(device) for name, values in cache[torch.device("cpu")].items()}
        return cache[device]

    def host_table(self) -> dict[str, list]:
        """The per-step coefficients as Python lists, for what is decided on the host once per `set_timesteps`
        (which steps draw noise), so no round reads a device value for it."""
        self.step_table("cpu")
        return self._pcr_tables["host"]

    def _step_plan(self, start: int) -> dict[str, list]:
        """For a chain that starts at position `start`: per position `i >= start` (lists of length N, anything
        before `start`) what the base scheduler decides from the number of calls since `set_timesteps`, such as the
        order of a multistep solver during its warm-up. `"form"` (1-based) picks the row of `(forms, N)` tables."""
        return {}

    def plan_table(self, start: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """`_step_plan(start)` as tensors on `device`, built once per `set_timesteps`, start and device."""
        self.step_table("cpu")  # the cache of this `set_timesteps`
        key = ("plan", start, torch.device(device))
        if key not in self._pcr_tables:
            plan = {name: torch.tensor(values) for name, values in self._step_plan(start).items()}
            self._pcr_tables[key] = {name: values.to(device) for name, values in plan.items()}
        return self._pcr_tables[key]

    def _coefficients(self, indices: torch.Tensor, like: torch.Tensor, start: int = 0) -> dict[str, torch.Tensor]:
        """Every table's values at `indices`, shaped `(n, 1, ..., 1)` in `like`'s dtype (for `(forms, N)` tables,
        the row the chain's plan picks for each step); gathered once for the same `indices` tensor (a round passes
        the same one to its several batched calls)."""
        table = self.step_table(indices.device)
        planned = any(values.ndim == 2 for values in table.values())  # only then does the chain's start matter
        key = (like.dtype, like.ndim, start if planned else None)
        cached = getattr(self, "_pcr_gathered", None)
        if cached is None or cached[0] != key or cached[1] is not indices or cached[2] is not table:
            forms = None
            if planned:
                forms = self.plan_table(start, indices.device)["form"][indices] - 1
            gathered = {}
            for name, values in table.items():
                rows = values[indices] if values.ndim == 1 else values[forms, indices]  # (n,)
                gathered[name] = rows.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)
            cached = self._pcr_gathered = (key, indices, table, gathered)
        return cached[3]

    def batch_convert_model_output(self, model_output, indices, sample, start: int = 0) -> torch.Tensor:
        """What later steps read of these steps' model outputs (multistep twins: x0, eps, ...), `(n, B, C, H, W)`."""
        return model_output

    def split_model_output(self, model_output: torch.Tensor, sample: torch.Tensor):
        """`(mean part, extra)`: the part of the model output the update's mean reads, and what else the model
        predicts (DDPM's learned variances) or None."""
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, got "
                f"{tuple(model_output.shape)}."
            )
        return model_output, None

    def join_model_output(self, mean: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """The inverse of `split_model_output`."""
        return mean if extra is None else torch.cat([mean, extra], dim=2)

    def batch_timesteps(self, indices: torch.Tensor) -> torch.Tensor:
        """`timesteps[indices]`, on the device of `indices`."""
        return self.step_table(indices.device)["timesteps"][indices]

    def noise_mask(self, **step_kwargs) -> list[bool]:
        """Which of the `timesteps` draw noise in the base `step`, given that step's keyword arguments."""
        return [False] * len(self.timesteps)

    def noise_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the base `step` draws its noise in, for a model output of `dtype`."""
        return dtype

    def draw_noise(
        self, shape, generator=None, device=None, dtype=torch.float32, steps: range | None = None, **step_kwargs
    ) -> torch.Tensor | None:
        """Draws the noise of the steps at positions `steps` (default: all N), `(len(steps), *shape)`, as the
        sequential loop over those steps would; None if none of them draws any.

        `shape`, `generator`, `device` and `dtype` are those of the model output the base `step` would see; steps
        that draw nothing get zeros. Drawn where the generator lives (as `randn_tensor` draws) and moved to `device`
        in one copy.
        """
        mask = self.noise_mask(**step_kwargs)
        mask = mask if steps is None else mask[steps.start : steps.stop]
        if not any(mask):
            return None
        dtype = self.noise_dtype(dtype)
        first = generator[0] if isinstance(generator, list) else generator
        draw_device = first.device if first is not None else device
        noise = torch.stack(
            [
                randn_tensor(shape, generator=generator, device=draw_device, dtype=dtype)
                if draws
                else torch.zeros(shape, device=draw_device, dtype=dtype)
                for draws in mask
            ]
        )
        return noise.to(device)

    def batch_scale_model_input(self, sample: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`scale_model_input` for many timesteps; the identity unless the base scheduler scales its input."""
        return sample

    def state_scale(self, indices: torch.Tensor) -> torch.Tensor:
        """The typical size of the state after each step `(n,)`: 1, or `sqrt(sigma^2 + 1)` for variance-exploding
        schedulers. Tolerances are taken relative to it."""
        table = self.step_table(indices.device)
        if "state_scale" in table:
            return table["state_scale"][indices].double()
        return torch.ones(len(indices), dtype=torch.float64, device=indices.device)

    def batch_step(self, model_output, indices, sample, noise=None, **step_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def batch_predict_x0(self, model_output, indices, sample) -> torch.Tensor:
        """The denoised prediction `x0` the model output stands for at `sample` (before any clipping)."""
        mean, _ = self.split_model_output(model_output, sample)
        return self._to_x0(mean, sample, self._coefficients(indices, sample))

    def batch_model_output_from_x0(self, x0, indices, sample, extra=None) -> torch.Tensor:
        """The model output that would predict `x0` at `sample` (with `extra` as the rest of the output): the
        inverse of `batch_predict_x0`."""
        return self.join_model_output(self._from_x0(x0, sample, self._coefficients(indices, sample)), extra)

    def _require_noise(self, noise) -> None:
        if noise is None:
            raise ValueError(f"These {type(self).__name__} steps draw noise: pass `noise` from `draw_noise`.")

    @classmethod
    def _get_compatibles(cls):
        """The parent's compatible schedulers, plus the parent and the twin (diffusers looks names up in its own
        module, which has neither twin)."""
        parent = next(base for base in cls.__mro__ if base.__module__.startswith("diffusers."))
        return list(dict.fromkeys([cls, parent, *super()._get_compatibles()]))

    @classmethod
    def from_scheduler(cls, scheduler):
        """The PCR twin of a diffusers scheduler, with every value of its config (nothing retuned).

        `_use_default_values` is dropped: `from_config` would reset the keys it lists to the class defaults, even
        where the config was changed since (StableDiffusionPipeline turns a defaulted `clip_sample=True` off).
        """
        return cls.from_config({key: value for key, value in scheduler.config.items() if key != "_use_default_values"})

    def _unsupported(self, option: str, value, allowed) -> ValueError:
        return ValueError(
            f"{type(self).__name__}'s batched step supports {option} in {tuple(allowed)}, got {value!r}; "
            "parallel sampling cannot reproduce this scheduler exactly."
        )


class PCRAlphaSigmaSchedulerMixin(PCRSchedulerMixin):
    """The model output's conversions for schedulers parametrised as `x = alpha * x0 + sigma * eps` (DPM-Solver++,
    UniPC, DEIS): tables `"alpha"` and `"sigma"`, and `"sigma_raw"`, the flow-matching sigma."""

    def _to_x0(self, model_output, sample, c):
        prediction, alpha, sigma = self.config.prediction_type, c["alpha"], c["sigma"]
        if prediction == "epsilon":
            return (sample - sigma * model_output) / alpha
        if prediction == "sample":
            return model_output
        if prediction == "v_prediction":
            return alpha * sample - sigma * model_output
        return sample - c["sigma_raw"] * model_output

    def _from_x0(self, x0, sample, c):
        prediction, alpha, sigma = self.config.prediction_type, c["alpha"], c["sigma"]
        if prediction == "epsilon":
            return (sample - alpha * x0) / sigma
        if prediction == "sample":
            return x0
        if prediction == "v_prediction":
            return (alpha * sample - x0) / sigma
        return (sample - x0) / c["sigma_raw"]
