"""What every pcr-diffusers pipeline shares: argument checks, the PCR scheduler, noise drawn like the sequential
pipeline, the denoising loop (parallel or sequential) with its progress bar, and the output with statistics.

Pipelines combine `PCRPipelineMixin` with the diffusers pipeline they stand in for, so prompt encoding, latents
preparation and decoding stay the parent's; only the denoising loop changes.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from diffusers.pipelines import pipeline_utils as diffusers_pipeline_utils
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .sampling import (
    DenoisingChain,
    SamplingStats,
    check_parallel_args,
    default_process_group,
    denoise_parallel,
    denoise_sequential,
)
from .schedulers import PCRScheduler, PCRSchedulerMixin

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class PCRImagePipelineOutput(ImagePipelineOutput):
    """`images` as diffusers returns them, plus how the denoising loop ran.

    Args:
        images: a list of PIL images, a numpy array `(B, H, W, C)` or a tensor `(B, C, H, W)`.
        stats: `SamplingStats` (rounds, model evaluations, converged, per-round residuals).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stats: SamplingStats | None = None


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

    def check_pcr_inputs(
        self, num_inference_steps, parallel, tolerance, jacobian, max_rounds, max_memory=None
    ) -> None:
        """Raises a clear `ValueError` for bad arguments or an unsupported scheduler, before any model call."""
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {steps!r}.")
        check_parallel_args(parallel, tolerance, jacobian, max_rounds, max_memory)
        PCRScheduler.from_scheduler(self.scheduler)

    @staticmethod
    def check_generator(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                f"size of {batch_size}. Make sure the batch size matches the length of the generators."
            )

    def pcr_scheduler(self, num_inference_steps: int, device=None, **set_timesteps_kwargs) -> PCRSchedulerMixin:
        """The PCR twin of `self.scheduler`, with its timesteps set as the sequential pipeline sets them."""
        scheduler = PCRScheduler.from_scheduler(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device, **set_timesteps_kwargs)
        return scheduler

    def pcr_denoise(
        self,
        model_fn,
        scheduler: PCRSchedulerMixin,
        latents: torch.Tensor,
        noise: torch.Tensor | None,
        *,
        parallel: int | str,
        tolerance: float,
        jacobian,
        max_rounds: int | None,
        max_memory: int | str | None = None,
        step_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, SamplingStats]:
        """The denoising loop: parallel over windows of `parallel` steps, or the plain loop when `parallel == 1`.

        Precision: a float16 or bfloat16 model runs in its dtype, but the solver's states, residuals and the
        scheduler's steps are float32 (and so are those of the sequential loop, `parallel=1`); the latents and noise
        are drawn in the model's dtype as the parent pipeline draws them, and the result is returned in it.
        Distributed: under an initialised `torch.distributed` group of several processes, every round's model call
        is split across them (`ShardedModel`), and only rank 0 shows a progress bar.
        """
        model_dtype = latents.dtype
        solver_dtype = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype
        noise = None if noise is None else noise.to(solver_dtype)
        chain = DenoisingChain(model_fn, scheduler, noise, step_kwargs, model_dtype=model_dtype)
        denoise = denoise_sequential if parallel == 1 else denoise_parallel
        main_process = default_process_group() is None or dist.get_rank() == 0
        with self.progress_bar(total=len(chain)) if main_process else nullcontext() as progress_bar:
            latents, stats = denoise(
                chain,
                latents.to(solver_dtype),
                parallel=parallel,
                tolerance=tolerance,
                jacobian=jacobian,
                max_rounds=max_rounds,
                max_memory=max_memory,
                progress_bar=progress_bar,
            )
        return latents.to(model_dtype), stats

    def images_from_samples(self, image: torch.Tensor, output_type: str):
        """`[-1, 1]` samples to `[0, 1]` images as `output_type` (`"pil"`, `"np"` or `"pt"`), as DDPMPipeline does."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1)
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
        return self.numpy_to_pil(image) if output_type == "pil" else image

    @staticmethod
    def check_output_type(output_type: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> None:
        if output_type not in allowed:
            raise ValueError(f"`output_type` must be one of {allowed}, got {output_type!r}.")

    def generate_unconditional(
        self, batch_size, generator, num_inference_steps, output_type, return_dict, solver: dict, step_kwargs=None
    ):
        """The whole call of an unconditional pipeline (DDPM, DDIM) with the parent's loop solved in parallel.

        `solver`: parallel, tolerance, jacobian, max_rounds, max_memory; `step_kwargs`: the scheduler step's extra
        arguments (DDIM's `eta`, `use_clipped_model_output`).
        """
        # 1. Check inputs, before any model call
        self.check_pcr_inputs(num_inference_steps, **solver)
        self.check_generator(generator, batch_size)
        self.check_output_type(output_type)

        # 2. Timesteps, initial latents and every step's noise, drawn in the sequential loop's order
        scheduler = self.pcr_scheduler(num_inference_steps)
        latents, noise = self.unconditional_latents(batch_size, generator, scheduler, self.unet.dtype, step_kwargs)

        # 3. Denoise
        model_fn = lambda x, t: self.unet(x, t).sample  # noqa: E731
        image, stats = self.pcr_denoise(model_fn, scheduler, latents, noise, step_kwargs=step_kwargs, **solver)

        # 4. Post-process
        image = self.images_from_samples(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, stats)
        return PCRImagePipelineOutput(images=image, stats=stats)

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
