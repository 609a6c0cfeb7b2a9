"""Classifier-free guidance inside the batched model call, as the text-to-image pipelines' loops guide one step:

    model_fn(x, t)                       # x: (n * B, C, H, W), the states of n consecutive steps
      -> model(cat([x_k, x_k]) for each step k, t, **conditioning repeated n times)   # (n * 2B, C, H, W)
      -> uncond + guidance_scale * (text - uncond)                                      # (n * B, C, H, W)

so one model call per round covers window x 2 x batch, and step k's rows are exactly the rows the sequential loop
passes to the model at step k. `pcr_diffusers.parent_loop` builds these from the parent loop's own model calls.
"""

import threading
from collections.abc import Callable

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

# Prompt encoding is not thread-safe in diffusers' pipelines: a fast tokenizer's padding and truncation settings are
# set on its shared backend at every call, so two prompts encoded at once can get each other's (measured: sequence
# lengths 2 and 16 met in one batch). Our pipelines encode under this lock; the rest of a call runs concurrently.
TEXT_ENCODING_LOCK = threading.Lock()
UNSUPPORTED = {  # arguments of the parent pipelines that we reject, and why
    "ip_adapter_image": "IP-Adapter is not implemented",
    "ip_adapter_image_embeds": "IP-Adapter is not implemented",
    "negative_ip_adapter_image": "IP-Adapter is not implemented",
    "negative_ip_adapter_image_embeds": "IP-Adapter is not implemented",
    "skip_guidance_layers": "skip-layer guidance is not implemented",
}


def repeat_steps(conditioning, n: int):
    """The conditioning of one step for `n` steps in one call: every tensor repeated `n` times along its first
    (batch) axis, in nested dicts, lists and tuples too; anything else (None, numbers) as it is."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.repeat(n, *([1] * (conditioning.ndim - 1)))
    if isinstance(conditioning, dict):
        return {key: repeat_steps(value, n) for key, value in conditioning.items()}
    if isinstance(conditioning, (list, tuple)):
        return type(conditioning)(repeat_steps(value, n) for value in conditioning)
    return conditioning


class GuidedModel:
    """`model_fn` for `DenoisingChain`: a conditional model with classifier-free guidance, many steps per call.

    Args:
        model: `model(model_input, t, **conditioning)` -> the model output, called as the sequential loop calls it.
        conditioning: keyword arguments of one step's call, with the parent's batch of `2B` rows (negative first)
            under guidance, else `B` rows.
        batch_size: `B`, the latents' batch.
        guidance_scale: the scale `w` of `uncond + w * (text - uncond)`; None for no guidance.
        guidance_rescale: `rescale_noise_cfg`'s factor (0 for none).
        shared: the names of conditioning entries that have no batch axis and are the same for every row (Flux's
            position ids `img_ids`, `txt_ids`, `(seq, 3)`): passed to every call as they are, not repeated per step.

    Called with `x` `(n * B, C, H, W)` and `t` `(n * B,)`, step-major, it runs the model once on `(n * 2B, ...)`:
    step k's rows are `[x_k; x_k]`, as the sequential loop's `torch.cat([latents] * 2)`. A `model` that
    `takes_positions` (see `DenoisingChain`) makes this one take them too, and gets them laid out like `t`.
    """

    def __init__(
        self,
        model: Callable,
        conditioning: dict,
        batch_size: int,
        guidance_scale: float | None,
        guidance_rescale: float = 0.0,
        shared: tuple[str, ...] = (),
    ):
        if missing := set(shared) - set(conditioning):
            raise ValueError(f"`shared` names {sorted(missing)}, which are not in `conditioning`.")
        self.model = model
        self.conditioning = conditioning
        self.shared = tuple(shared)
        self.batch_size = batch_size
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self._repeated = {}  # n -> conditioning for n steps; the window size changes only near the end
        self.takes_positions = getattr(model, "takes_positions", False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0] // self.batch_size
        if n not in self._repeated:
            per_row = {key: value for key, value in self.conditioning.items() if key not in self.shared}
            self._repeated = {n: {**self.conditioning, **repeat_steps(per_row, n)}}
        extra = {} if positions is None else {"positions": positions}
        if self.guidance_scale is None:
            return self.model(x, t, **extra, **self._repeated[n])
        copies = (n, 2, self.batch_size)

        def both(rows):  # (n * B, ...) -> (n * 2B, ...): each step's rows, for the negative then the positive prompt
            return rows.unflatten(0, (n, 1, self.batch_size)).expand(*copies, *rows.shape[1:]).flatten(0, 2)

        x, t, extra = both(x), both(t), {name: both(rows) for name, rows in extra.items()}
        uncond, text = self.model(x, t, **extra, **self._repeated[n]).unflatten(0, copies).unbind(1)  # (n, B, ...)
        guided = (uncond + self.guidance_scale * (text - uncond)).flatten(0, 1)
        if self.guidance_rescale > 0.0:
            guided = rescale_noise_cfg(guided, text.flatten(0, 1), guidance_rescale=self.guidance_rescale)
        return guided
