"""What every pcr-diffusers pipeline shares: argument checks, the PCR scheduler, noise drawn like the sequential
pipeline, the denoising loop (parallel or sequential) with its progress bar, and the output with statistics.

Pipelines combine `PCRPipelineMixin` with the diffusers pipeline they stand in for, so prompt encoding, latents
preparation and decoding stay the parent's; only the denoising loop changes.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .sampling import DenoisingChain, SamplingStats, check_parallel_args, denoise_parallel, denoise_sequential
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
            kwargs["torch_dtype"] = pipeline.dtype
        return super().from_pipe(pipeline, **kwargs)

    def check_pcr_inputs(self, num_inference_steps, parallel, tolerance, jacobian, max_rounds) -> None:
        """Raises a clear `ValueError` for bad arguments or an unsupported scheduler, before any model call."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        check_parallel_args(parallel, tolerance, jacobian, max_rounds)
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
        parallel: int,
        tolerance: float,
        jacobian,
        max_rounds: int | None,
        step_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, SamplingStats]:
        """The denoising loop: parallel over windows of `parallel` steps, or the plain loop when `parallel == 1`."""
        chain = DenoisingChain(model_fn, scheduler, noise, step_kwargs)
        denoise = denoise_sequential if parallel == 1 else denoise_parallel
        with self.progress_bar(total=len(chain)) as progress_bar:
            return denoise(
                chain,
                latents,
                parallel=parallel,
                tolerance=tolerance,
                jacobian=jacobian,
                max_rounds=max_rounds,
                progress_bar=progress_bar,
            )

    def images_from_samples(self, image: torch.Tensor, output_type: str):
        """`[-1, 1]` samples to `[0, 1]` images as `output_type` (`"pil"`, `"np"` or `"pt"`), as DDPMPipeline does."""
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1)
        image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()  # numpy has no bfloat16
        return self.numpy_to_pil(image) if output_type == "pil" else image

    @staticmethod
    def check_output_type(output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

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
