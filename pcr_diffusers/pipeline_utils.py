"""What every pcr-diffusers pipeline shares: argument checks, the PCR scheduler, noise drawn like the sequential
pipeline, the denoising loop (parallel or sequential) with its progress bar, the parent's output with statistics,
and saving a folder that `DiffusionPipeline.from_pretrained` reloads as the same pipeline.

Pipelines combine `PCRPipelineMixin` with the diffusers pipeline they stand in for, so prompt encoding, latents
preparation and decoding stay the parent's; only the denoising loop changes. A call works on its own shallow copy of
the pipeline (`for_call`), with its own scheduler twin: the parents keep per-call state on the pipeline (guidance
scale, timesteps, `init_noise_sigma`), which two threads calling one pipeline would otherwise overwrite.
"""

import copy
import json
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.pipelines import pipeline_utils as diffusers_pipeline_utils
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import is_compiled_module, randn_tensor

from .sampling import (
    DenoisingChain,
    ParallelOptions,
    SamplingStats,
    default_process_group,
    denoise_parallel,
    denoise_sequential,
    is_positive_int,
)
from .schedulers import PCRScheduler, PCRSchedulerMixin

# The key of a saved folder's model_index.json that names its pcr-diffusers pipeline class.
PCR_CLASS_KEY = "_pcr_class_name"
_last_stats = threading.local()  # per thread: pipeline -> the SamplingStats of its last call in this thread


class PCRPipelineMixin:
    """Parallel-in-time denoising for a diffusers pipeline; see the module docstring."""

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """`DiffusionPipeline.from_pipe`, sharing the components without changing their dtype.

        diffusers' `from_pipe` casts the (shared) components to float32 unless told otherwise, which would silently
        change the user's original pipeline too; here the default dtype is the existing pipeline's.
        """
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # diffusers renamed `torch_dtype` to `dtype` (the old name warns); `_resolve_dtype` marks the versions.
            kwargs["dtype" if hasattr(diffusers_pipeline_utils, "_resolve_dtype") else "torch_dtype"] = pipeline.dtype
        return super().from_pipe(pipeline, **kwargs)

    @property
    def stats(self) -> SamplingStats | None:
        """How the last call of this pipeline in the current thread ran (rounds, model evaluations, convergence):
        the same object as the output's `.stats`, and available after `return_dict=False` too. Per thread, so
        concurrent calls each see their own."""
        return getattr(_last_stats, "table", {}).get(self)

    def for_call(self, scheduler: PCRSchedulerMixin):
        """A shallow copy of the pipeline for one call, sharing every model, with `scheduler` as its scheduler.

        The parent's methods (`prepare_latents`, `encode_prompt`, ...) run on the copy unchanged, and whatever they
        or we store on it (guidance scale, timesteps) stays with this call.
        """
        pipe = copy.copy(self)
        pipe._pcr_caller = self
        object.__setattr__(pipe, "scheduler", scheduler)  # not through __setattr__: the shared config stays
        return pipe

    def pcr_output(self, output: BaseOutput, stats: SamplingStats, return_dict: bool):
        """Frees the model hooks as the parent does, records `stats` (`record_call`), and returns the parent's
        output, or the parent's tuple (None kept: StableDiffusionPipeline's tuple has `nsfw_content_detected` even
        when None, which `BaseOutput.to_tuple` would drop)."""
        self.maybe_free_model_hooks()
        self.record_call(stats)
        if not return_dict:
            return tuple(getattr(output, name) for name in output.__dataclass_fields__)
        output.stats = stats  # an attribute, not a field: the output unpacks and indexes like the parent's
        return output

    def record_call(self, stats: SamplingStats) -> None:
        """After a call on this copy (`for_call`): copies to the calling pipeline what the parent leaves readable
        after a call (`num_timesteps`, ...), but the call's own stand-ins, and records `stats` as its
        `pipeline.stats` in this thread."""
        caller = getattr(self, "_pcr_caller", self)
        per_call = ("scheduler", "_pcr_caller", "_pcr_per_call", *getattr(self, "_pcr_per_call", ()))
        for name, value in vars(self).items():
            unchanged = name in vars(caller) and vars(caller)[name] is value  # a None the caller lacks is new too
            if name not in per_call and not unchanged:
                object.__setattr__(caller, name, value)
        if not hasattr(_last_stats, "table"):
            _last_stats.table = weakref.WeakKeyDictionary()
        _last_stats.table[caller] = stats

    @staticmethod
    def check_num_inference_steps(num_inference_steps, custom_schedule: bool = False) -> int | None:
        """A positive int of any integral type, or None where custom `timesteps`/`sigmas` set the schedule."""
        if num_inference_steps is None and custom_schedule:
            return None
        if not is_positive_int(num_inference_steps):
            allowed = "a positive int" + (", or None with custom `timesteps` or `sigmas`" if custom_schedule else "")
            raise ValueError(f"`num_inference_steps` must be {allowed}, got {num_inference_steps!r}.")
        return int(num_inference_steps)

    def check_scheduler(self) -> None:
        """The scheduler's twin exists: a clear error otherwise, before any model call."""
        PCRScheduler.from_scheduler(self.scheduler)

    @staticmethod
    def check_generator(generator, batch_size: int) -> None:
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(
                    f"You have passed a list of generators of length {len(generator)}, but requested an effective "
                    f"batch size of {batch_size}. Make sure the batch size matches the length of the generators."
                )
            bad = [g for g in generator if not isinstance(g, torch.Generator)]
        else:
            bad = [] if generator is None or isinstance(generator, torch.Generator) else [generator]
        if bad:
            raise TypeError(
                f"`generator` must be a torch.Generator, a list of them or None, got {type(bad[0]).__name__}."
            )

    def pcr_scheduler(self, num_inference_steps: int, device=None, **set_timesteps_kwargs) -> PCRSchedulerMixin:
        """A new PCR twin of `self.scheduler`, with its timesteps set as the sequential pipeline sets them."""
        scheduler = PCRScheduler.from_scheduler(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device, **set_timesteps_kwargs)
        scheduler.host_table()  # a configuration the batched step cannot follow fails here, before any model call
        return scheduler

    def pcr_denoise(
        self,
        model_fn,
        scheduler: PCRSchedulerMixin,
        latents: torch.Tensor,
        noise: torch.Tensor | None,
        options: ParallelOptions,
        step_kwargs: dict | None = None,
        steps: range | None = None,
        after_step: Callable | None = None,
        keep_states: bool = False,
    ) -> tuple[torch.Tensor, SamplingStats]:
        """The denoising loop: parallel over windows of `options.parallel` steps, or the plain loop for 1.

        `steps`: the positions of the schedule to run (default all); `after_step`: what a step does besides the
        scheduler's step (default nothing); see `DenoisingChain` for both.
        `keep_states`: return every step's accepted state `(N, B, C, H, W)`, in the solver's dtype, not the last
        (the parallel solve holds them anyway; the plain loop then keeps them too, N latents of memory).
        Precision: a float16 or bfloat16 model runs in its dtype, but the solver's states, residuals and the
        scheduler's steps are float32 (and so are those of the sequential loop, `parallel=1`); the latents and noise
        are drawn in the model's dtype as the parent pipeline draws them, and the result is returned in it.
        Distributed: under an initialised `torch.distributed` group of several processes, every round's model call
        is split across them (`ShardedModel`), and only rank 0 shows a progress bar.
        """
        model_dtype = latents.dtype
        solver_dtype = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype
        noise = None if noise is None else noise.to(latents.device, solver_dtype)
        # a compiled model gets one shape per call: it compiles once, and CUDA graphs capture one call
        static_shapes = any(is_compiled_module(component) for component in self.components.values())
        chain = DenoisingChain(
            model_fn,
            scheduler,
            noise,
            step_kwargs,
            model_dtype=model_dtype,
            steps=steps,
            static_shapes=static_shapes,
            after_step=after_step,
        )
        denoise = denoise_sequential if options.parallel == 1 else denoise_parallel
        main_process = default_process_group() is None or dist.get_rank() == 0
        with self.progress_bar(total=len(chain)) if main_process else nullcontext() as progress_bar:
            latents, stats = denoise(
                chain,
                latents.to(solver_dtype),
                **options.as_kwargs(),
                progress_bar=progress_bar,
                keep_states=keep_states,
            )
        if keep_states:
            return latents, stats
        return latents.to(model_dtype), stats

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`DiffusionPipeline.save_pretrained`, saving an ordinary folder of the parent pipeline.

        The folder names the parent's class, so the parent, `DiffusionPipeline.from_pretrained` and every other
        diffusers tool load it as they load the parent's; it also records this class under `_pcr_class_name`
        (diffusers ignores keys that start with `_`), so `ThisClass.from_pretrained(folder)` and
        `PCRAutoPipeline.from_pretrained(folder)` return this pipeline.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = parent_pipeline_class(type(self)).__name__
        config[PCR_CLASS_KEY] = type(self).__name__
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def images_from_samples(self, image: torch.Tensor, output_type: str):
        """`[-1, 1]` samples to `[0, 1]` images as `DDPMPipeline` returns them: a tensor `(B, C, H, W)` for `"pt"`,
        PIL images for `"pil"`, else numpy `(B, H, W, C)`."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1)
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
        return self.numpy_to_pil(image) if output_type == "pil" else image

    def generate_unconditional(
        self, batch_size, generator, num_inference_steps, output_type, return_dict, options, step_kwargs=None
    ):
        """The whole call of an unconditional pipeline (DDPM, DDIM) with the parent's loop solved in parallel.

        `options`: the `ParallelOptions`; `step_kwargs`: the scheduler step's extra arguments (DDIM's `eta`,
        `use_clipped_model_output`).
        """
        # 1. Check inputs, before any model call
        num_inference_steps = self.check_num_inference_steps(num_inference_steps)
        if not is_positive_int(batch_size):
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
        batch_size = int(batch_size)
        self.check_generator(generator, batch_size)

        # 2. Timesteps, initial latents and every step's noise, drawn in the sequential loop's order
        scheduler = self.pcr_scheduler(num_inference_steps)
        latents, noise = self.unconditional_latents(batch_size, generator, scheduler, self.unet.dtype, step_kwargs)

        # 3. Denoise
        model_fn = lambda x, t: self.unet(x, t).sample  # noqa: E731
        image, stats = self.pcr_denoise(model_fn, scheduler, latents, noise, options, step_kwargs=step_kwargs)

        # 4. Post-process, as the parent does
        output = diffusers_pipeline_utils.ImagePipelineOutput(images=self.images_from_samples(image, output_type))
        return self.pcr_output(output, stats, return_dict)

    def unconditional_latents(self, batch_size, generator, scheduler, dtype, step_kwargs=None):
        """The initial latents and every step's noise, drawn from `generator` in the sequential loop's order."""
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        shape = (batch_size, self.unet.config.in_channels, *sample_size)
        device = self._execution_device
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none
        noise = scheduler.draw_noise(shape, generator=generator, device=device, dtype=dtype, **(step_kwargs or {}))
        return latents, noise


def parent_pipeline_class(pipeline_class):
    """The diffusers pipeline a pcr-diffusers pipeline class stands in for."""
    return next(base for base in pipeline_class.__mro__ if base.__module__.startswith("diffusers."))
