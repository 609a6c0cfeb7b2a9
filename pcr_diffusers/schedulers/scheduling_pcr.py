"""What parallel sampling asks of a scheduler: the update of many timesteps in one vectorised call.

A PCR scheduler subclasses a diffusers scheduler, so its config, `set_timesteps`, timestep spacings and `step` are
the base scheduler's own. It adds:

- `batch_step(model_output, indices, sample, noise)`: the base `step` for the timesteps at positions `indices` of
  `timesteps`, all at once, with the step's random draw passed in as standard-normal `noise` instead of drawn;
- `draw_noise(shape, generator, ...)`: every draw the sequential loop makes after the initial latents, in the same
  order and from the same generator, so the parallel result equals the sequential one for the same seed;
- `batch_scale_model_input(sample, indices)` and `state_scale(indices)`;
- `batch_predict_x0` and `batch_model_output_from_x0`: the conversions between the model's output and its
  denoised prediction, which the solver's Jacobians and predictors use.

Arrays are `(n, *shape)`: the n timesteps first, then the pipeline's latents shape `(B, C, H, W)`. Per-step
coefficients are computed once per `set_timesteps`, step by step with the base scheduler's own scalar arithmetic,
so they are bitwise the ones its `step` uses.
"""

import torch
from diffusers.utils.torch_utils import randn_tensor


def per_step(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gathers per-step coefficients `(N,)` at `indices` and shapes them `(n, 1, ..., 1)` to broadcast like `like`."""
    out = values.to(like.device)[indices.to(like.device)]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class PCRSchedulerMixin:
    """Batched steps for a diffusers scheduler; see the module docstring. Subclasses set `_supported` options."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._table = self._step_table()

    def _step_table(self) -> dict[str, torch.Tensor]:
        """Per-step coefficients `(N,)`, computed with the base scheduler's scalar arithmetic."""
        raise NotImplementedError

    def _check_ready(self, model_output: torch.Tensor, sample: torch.Tensor) -> None:
        if getattr(self, "_table", None) is None:
            raise RuntimeError("Call `set_timesteps` before `batch_step`.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` must have the shape of `sample` {tuple(sample.shape)}, "
                f"got {tuple(model_output.shape)}."
            )

    def noise_mask(self, **step_kwargs) -> list[bool]:
        """Which of the `timesteps` draw noise in the base `step`, given that step's keyword arguments."""
        return [False] * len(self.timesteps)

    def noise_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the base `step` draws its noise in, for a model output of `dtype`."""
        return dtype

    def draw_noise(
        self, shape, generator=None, device=None, dtype=torch.float32, **step_kwargs
    ) -> torch.Tensor | None:
        """Draws the noise of all steps, `(N, *shape)`, as the sequential loop would; None if no step draws any.

        `shape`, `generator`, `device` and `dtype` are those of the model output the base `step` would see; steps
        that draw nothing get zeros.
        """
        mask = self.noise_mask(**step_kwargs)
        if not any(mask):
            return None
        dtype = self.noise_dtype(dtype)
        return torch.stack(
            [
                randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                if draws
                else torch.zeros(shape, device=device, dtype=dtype)
                for draws in mask
            ]
        )

    def batch_scale_model_input(self, sample: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`scale_model_input` for many timesteps; the identity unless the base scheduler scales its input."""
        return sample

    def state_scale(self, indices: torch.Tensor) -> torch.Tensor:
        """The typical size of the state after each step `(n,)`: 1, or `sqrt(sigma^2 + 1)` for variance-exploding
        schedulers. Tolerances are taken relative to it."""
        return torch.ones(len(indices), dtype=torch.float64)

    def batch_step(self, model_output, indices, sample, noise=None, **step_kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _coefficients(self, indices: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: per_step(values, indices, like).to(like.dtype) for name, values in self._table.items()}

    def batch_predict_x0(self, model_output, indices, sample) -> torch.Tensor:
        """The denoised prediction `x0` the model output stands for at `sample` (before any clipping)."""
        return self._to_x0(model_output, sample, self._coefficients(indices, sample))

    def batch_model_output_from_x0(self, x0, indices, sample) -> torch.Tensor:
        """The model output that would predict `x0` at `sample`: the inverse of `batch_predict_x0`."""
        return self._from_x0(x0, sample, self._coefficients(indices, sample))

    @classmethod
    def from_scheduler(cls, scheduler):
        """The PCR twin of a diffusers scheduler, with every value of its config (nothing retuned).

        `_use_default_values` is dropped: `from_config` would reset the keys it lists to the class defaults, even
        where the config was changed since (StableDiffusionPipeline turns a defaulted `clip_sample=True` off).
        """
        return cls.from_config({key: value for key, value in scheduler.config.items() if key != "_use_default_values"})

    def _unsupported(self, option: str, value, allowed) -> ValueError:
        return ValueError(f"{type(self).__name__} supports {option} in {tuple(allowed)}, got {value!r}.")
