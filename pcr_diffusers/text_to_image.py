"""What the text-to-image pipelines share: classifier-free guidance inside the batched model call, timesteps and
step noise as the parent pipeline would make them, and the checks that run before any model call.

A text-to-image pipeline of pcr-diffusers is `PCRTextToImageMixin` + the diffusers pipeline it stands in for. Its
`__call__` keeps the parent's steps (`check_inputs`, `encode_prompt`, `prepare_latents`, decoding) and replaces
only the denoising loop:

    model_fn(x, t)                       # x: (n * B, C, H, W), the states of n consecutive steps
      -> model(cat([x_k, x_k]) for each step k, t, **conditioning repeated n times)   # (n * 2B, C, H, W)
      -> uncond + guidance_scale * (text - uncond)                                      # (n * B, C, H, W)

so one model call per round covers window x 2 x batch, and step k's rows are exactly the rows the sequential loop
passes to the model at step k.
"""

import threading
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils.torch_utils import get_module_execution_device

from .pipeline_utils import PCRPipelineMixin, parent_pipeline_class
from .sampling import ParallelOptions, SamplingStats
from .schedulers import PCRScheduler, PCRSchedulerMixin

# Prompt encoding is not thread-safe in diffusers' pipelines: a fast tokenizer's padding and truncation settings are
# set on its shared backend at every call, so two prompts encoded at once can get each other's (measured: sequence
# lengths 2 and 16 met in one batch). Our pipelines encode under this lock; the rest of a call runs concurrently.
TEXT_ENCODING_LOCK = threading.Lock()
_LEGACY_CALLBACK = (
    "the legacy per-step callback is not implemented (use `callback_on_step_end`, which diffusers advises)"
)
UNSUPPORTED = {  # arguments of the parent pipelines that we reject, and why
    "callback": _LEGACY_CALLBACK,
    "callback_steps": _LEGACY_CALLBACK,
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


# Attributes a callback may change: the step's timestep (we set it, as the parents do) and the progress bar's display.
_UNWATCHED = ("_current_timestep", "_progress_bar_config")
_DELETED = object()


def _fingerprint(value):
    """What tells whether a pipeline attribute changed: the value of a number, string or None, the entries of a
    dict, else the object itself (compared by identity)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return type(value), value
    if isinstance(value, dict):
        return tuple((key, _fingerprint(item)) for key, item in value.items())
    return id(value)


def _same_tensor(before, after) -> bool:
    if before is after:
        return True
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return False
    return (before.shape, before.dtype, before.device) == (after.shape, after.dtype, after.device) and bool(
        torch.allclose(before, after, rtol=0, atol=0, equal_nan=True)
    )


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


class StepEndCallback:
    """A parent's `callback_on_step_end`, called after the solve for every step in order, as `pcr_denoise`'s
    `step_end(i, t, latents)`: `callback(pipe, i, t, callback_kwargs)`, with the parent loop's `i` and `t` and, in
    `callback_kwargs`, the tensors named in `tensor_inputs` as the parent has them after step i (`latents`: the
    accepted state after step i; the others: the conditioning the steps read). Each step gets copies, so a callback
    may keep them.

    Parallel sampling solves all steps together, so a callback can only observe them. Where the parent would let it
    steer the later steps, by returning (or changing in place) a tensor the parent reads back, or by changing an
    attribute the pipeline had before the callbacks (`_guidance_scale`, `_interrupt`, ...; those a callback adds are
    its own), this raises a `ValueError` at that step, after the fact: the steps were solved before any callback
    ran.

    Args:
        pipe: the call's pipeline, passed to the callback as the parent passes itself.
        callback: the `callback_on_step_end`: a function, `PipelineCallback` or `MultiPipelineCallbacks`.
        tensor_inputs: the names of the tensors the callback gets (`callback_on_step_end_tensor_inputs`).
        tensors: by name, every tensor of the parent's `_callback_tensor_inputs` but `latents`, as its loop holds
            them (None where the parent's is None).
    """

    def __init__(self, pipe, callback: Callable, tensor_inputs: list[str], tensors: dict):
        if missing := set(pipe._callback_tensor_inputs) - {"latents", *tensors}:
            raise ValueError(f"`tensors` lacks {sorted(missing)} of {type(pipe).__name__}'s callback tensor inputs.")
        self.pipe = pipe
        self.callback = callback
        self.tensor_inputs = list(tensor_inputs)
        self.tensors = tensors
        self.watched = [name for name in vars(pipe) if name not in _UNWATCHED]  # not those the callbacks add

    def __call__(self, i: int, t: torch.Tensor, latents: torch.Tensor) -> None:
        pipe = self.pipe
        shown_timestep = "_current_timestep" in vars(pipe)  # the parents that have it (Flux, Wan) set it per step
        if shown_timestep:
            pipe._current_timestep = t
        watched = {name: vars(pipe).get(name, _DELETED) for name in self.watched}
        before = {name: _fingerprint(value) for name, value in watched.items()}
        current = {"latents": latents, **self.tensors}
        given = {name: _copy(current[name]) for name in self.tensor_inputs}
        returned = self.callback(pipe, i, t, given)
        if shown_timestep:
            pipe._current_timestep = None  # as the parents leave it after their loop
        if not isinstance(returned, dict):
            raise TypeError(
                f"`callback_on_step_end` must return the `callback_kwargs` dict, as in diffusers (whose pipelines pop "
                f"values from it), got {type(returned).__name__} at step {i}."
            )
        for name, value in current.items():
            seen = [returned[name]] if name in returned else []  # what the parent pops back
            seen += [given[name]] if name in given else []  # changed in place, the parent would read it too
            if not all(_same_tensor(value, other) for other in seen):
                self.refuse(f"changed `{name}`", i, t)
        for name, value in before.items():
            now = vars(pipe).get(name, _DELETED)
            if now is _DELETED or _fingerprint(now) != value:
                change = "deleted it" if now is _DELETED else f"{watched[name]!r} -> {now!r}"
                self.refuse(f"changed `pipe.{name}` ({change})", i, t)

    def refuse(self, what: str, i: int, t) -> None:
        ours = type(self.pipe).__name__
        parent = parent_pipeline_class(type(self.pipe)).__name__
        raise ValueError(
            f"`callback_on_step_end` {what} at step {i} (timestep {float(t):g}): in {parent} that can steer the "
            f"later steps (their latents, conditioning or guidance, or whether they run at all), but {ours} solves "
            f"all steps together, so a callback can only observe them, never steer. The callbacks run after the "
            f"solve, in step order, so this was found only after every step had been computed. Return "
            f"`callback_kwargs` unchanged and leave the pipeline's attributes as they are, or use {parent} for a "
            f"callback that steers (e.g. `SDCFGCutoffCallback`)."
        )


class PCRTextToImageMixin(PCRPipelineMixin):
    """Parallel-in-time denoising for a diffusers text-to-image pipeline; see the module docstring."""

    def check_text_to_image_inputs(self, num_inference_steps, custom_schedule: bool, **unsupported) -> int | None:
        """Our checks, before any model call: `num_inference_steps` (None allowed with custom `timesteps` or
        `sigmas`, as in the parents), the scheduler, and the parent's arguments that parallel sampling does not
        support (`unsupported`: name -> value, an error unless None). Returns `num_inference_steps` as an int."""
        num_inference_steps = self.check_num_inference_steps(num_inference_steps, custom_schedule)
        self.check_scheduler()
        for name, value in unsupported.items():
            if value is not None:
                parent = parent_pipeline_class(type(self)).__name__
                raise ValueError(
                    f"{type(self).__name__} does not support `{name}`: "
                    f"{UNSUPPORTED.get(name, f'it is not an argument of {parent}')}. Leave it unset, or use {parent}."
                )
        return num_inference_steps

    @staticmethod
    def step_end_tensor_inputs(callback, tensor_inputs: list[str]) -> list[str]:
        """The tensors a `callback_on_step_end` gets, as the parents choose them: a `PipelineCallback`'s or
        `MultiPipelineCallbacks`' own `tensor_inputs`, else `callback_on_step_end_tensor_inputs`."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            return callback.tensor_inputs
        return tensor_inputs

    def step_end_callback(self, callback, tensor_inputs: list[str], **tensors) -> StepEndCallback | None:
        """`StepEndCallback` for `pcr_denoise`'s `step_end`, or None without a callback. `tensors`: the parent
        loop's tensors that a callback may read, but `latents`."""
        return None if callback is None else StepEndCallback(self, callback, tensor_inputs, tensors)

    def effective_batch_size(self, prompt, prompt_embeds, num_images_per_prompt: int, generator) -> int:
        """The parent's batch of latents (prompts x images per prompt); checks the generators against it now, where
        the parent would only after encoding the prompt."""
        if isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        batch_size *= num_images_per_prompt
        self.check_generator(generator, batch_size)
        return batch_size

    def for_text_to_image_call(self):
        """`for_call` with a new twin of the scheduler, whose timesteps `pcr_timesteps` sets."""
        return self.for_call(PCRScheduler.from_scheduler(self.scheduler))

    def pcr_timesteps(
        self, num_inference_steps, timesteps=None, sigmas=None, **set_timesteps_kwargs
    ) -> PCRSchedulerMixin:
        """Sets the timesteps of this call's scheduler twin as the parent's `retrieve_timesteps` sets its
        scheduler's (its errors for unsupported custom `timesteps` / `sigmas` are the parent's too), and returns the
        twin. Its `init_noise_sigma`, which the parent's `prepare_latents` reads, depends on them.

        The twin keeps its timesteps on the CPU, where diffusers computes them before moving them to the pipeline's
        device (the same values): its per-step tables are built from them once and moved to the latents' device
        once (`PCRSchedulerMixin.step_table`), and no round copies a table or a timestep between devices.
        """
        retrieve_timesteps(self.scheduler, num_inference_steps, None, timesteps, sigmas, **set_timesteps_kwargs)
        self._num_timesteps = len(self.scheduler.timesteps)
        return self.scheduler

    def pcr_image_to_image_timesteps(
        self, num_inference_steps, strength, timesteps=None, sigmas=None, **get_timesteps_kwargs
    ) -> tuple[PCRSchedulerMixin, range]:
        """The timesteps of an image-to-image call: `pcr_timesteps`, then the parent's `get_timesteps`, which keeps
        the schedule's last steps as `strength` (or SDXL's `denoising_start`, in `get_timesteps_kwargs`) says and
        sets the scheduler's begin index. Returns the twin and the positions of the kept steps, `range(begin, N)`,
        for `DenoisingChain(steps=...)` and `draw_noise(steps=...)`.

        No model runs here, so a call that keeps no step fails before any model call (the inpainting parent raises
        too, after encoding the prompt; `StableDiffusionImg2ImgPipeline` would return an empty batch).
        """
        scheduler = self.pcr_timesteps(num_inference_steps, timesteps, sigmas)
        if timesteps is not None or sigmas is not None:
            num_inference_steps = len(scheduler.timesteps)  # as `retrieve_timesteps` returns it to the parent
        kept, _ = self.get_timesteps(num_inference_steps, strength, self._execution_device, **get_timesteps_kwargs)
        steps = range(len(scheduler.timesteps) - len(kept), len(scheduler.timesteps))
        if not steps:
            given = {"strength": strength, "num_inference_steps": num_inference_steps, **get_timesteps_kwargs}
            raise ValueError(
                f"{', '.join(f'`{name}`={value!r}' for name, value in given.items() if value is not None)} leave no "
                f"denoising step of the {len(scheduler.timesteps)} timesteps: the parent runs "
                f"`int(num_inference_steps * strength)` of them. Raise `strength` or `num_inference_steps`."
            )
        self._num_timesteps = len(steps)
        return scheduler, steps

    def sd_prompt_embeds(
        self, prompt, negative_prompt, num_images_per_prompt, prompt_embeds=None, negative_prompt_embeds=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Stable Diffusion parents' `encode_prompt` (under `TEXT_ENCODING_LOCK`) with their LoRA scale and
        `clip_skip`: `(2B, S, D)` with the negative embeddings first under guidance, as the sequential loop batches
        them, else `(B, S, D)`; and the negative embeddings as the parent's loop holds them (for its callbacks)."""
        with TEXT_ENCODING_LOCK:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                self._execution_device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=(self.cross_attention_kwargs or {}).get("scale"),
                clip_skip=self.clip_skip,
            )
        if self.do_classifier_free_guidance:
            return torch.cat([negative_prompt_embeds, prompt_embeds]), negative_prompt_embeds
        return prompt_embeds, negative_prompt_embeds

    def unet_step_inputs(self, scheduler, latents, generator, eta, batch_size, steps: range | None = None):
        """For UNet pipelines: the parent's scheduler-step kwargs without the generator, the noise of the steps
        `steps` drawn from it in the sequential loop's order, and the guidance embedding `timestep_cond` of
        LCM-style UNets."""
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        noise = scheduler.draw_noise(
            latents.shape,
            step_kwargs.pop("generator", None),
            latents.device,
            latents.dtype,
            steps=steps,
            **step_kwargs,
        )
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=latents.device, dtype=latents.dtype)
        return step_kwargs, noise, timestep_cond

    def decode_with_safety_checker(self, latents, output_type: str, generator, **decode_kwargs):
        """The Stable Diffusion parents' last step: decode (unless `output_type="latent"`), run the safety checker,
        post-process. Returns `(images, nsfw_content_detected)`."""
        image, has_nsfw_concept = latents, None
        if output_type != "latent":
            latents = latents / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False, generator=generator, **decode_kwargs)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, self._execution_device, latents.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        return image, has_nsfw_concept

    def decode_sdxl_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The SDXL parents' decoding: VAE upcasting, latents mean/std or scaling factor, watermark."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return image

    def unet_model(self, x, t, **conditioning):
        """One UNet call as the sequential loop makes it."""
        output = self.unet(x, t, cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False, **conditioning)
        return output[0]

    def guided_denoise(
        self,
        model: Callable,
        conditioning: dict,
        scheduler: PCRSchedulerMixin,
        latents: torch.Tensor,
        noise: torch.Tensor | None,
        options: ParallelOptions,
        *,
        guidance_rescale: float = 0.0,
        step_kwargs: dict | None = None,
        steps: range | None = None,
        after_step: Callable | None = None,
        step_end: StepEndCallback | None = None,
    ) -> tuple[torch.Tensor, SamplingStats]:
        """`pcr_denoise` with `GuidedModel(model, conditioning, ...)` as the model; guidance as
        `self.do_classifier_free_guidance` and `self.guidance_scale` say."""
        guidance_scale = self.guidance_scale if self.do_classifier_free_guidance else None
        model_fn = GuidedModel(model, conditioning, latents.shape[0], guidance_scale, guidance_rescale)
        return self.pcr_denoise(
            model_fn,
            scheduler,
            latents,
            noise,
            options,
            step_kwargs=step_kwargs,
            steps=steps,
            after_step=after_step,
            step_end=step_end,
        )
