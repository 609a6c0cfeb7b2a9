"""PCRDDIMPipeline: `DDIMPipeline` sampled in parallel over time (Newton + parallel cyclic reduction).

A diffusers community pipeline: use it as `PCRDDIMPipeline.from_pipe(ddim_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_ddim.py")`.
"""

import torch
from diffusers import DDIMPipeline

from pcr_diffusers.pipeline_utils import PCRImagePipelineOutput, PCRPipelineMixin
from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE


class PCRDDIMPipeline(PCRPipelineMixin, DDIMPipeline):
    """Unconditional image generation like `DDIMPipeline`, with the denoising loop solved in parallel.

    For the same `generator` the images equal `DDIMPipeline`'s up to the tolerance, for `eta = 0` and `eta > 0`
    alike: the noise of every step is drawn up front in the order the sequential loop draws it.
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        parallel: int | str = DEFAULT_PARALLEL,
        tolerance: float = DEFAULT_TOLERANCE,
        jacobian: str = "auto",
        max_rounds: int | None = None,
        max_memory: int | str | None = None,
    ) -> PCRImagePipelineOutput | tuple:
        r"""Generates images.

        Args:
            batch_size, generator, eta, num_inference_steps, use_clipped_model_output, output_type, return_dict:
                as in `DDIMPipeline`.
            parallel, tolerance, jacobian, max_rounds, max_memory: as in `PCRDDPMPipeline`.

        Returns:
            `PCRImagePipelineOutput` with `images` and `stats`, or the tuple `(images, stats)`.
        """
        # 1. Check inputs, before any model call
        self.check_pcr_inputs(num_inference_steps, parallel, tolerance, jacobian, max_rounds, max_memory)
        self.check_generator(generator, batch_size)
        self.check_output_type(output_type)
        step_kwargs = {"eta": eta, "use_clipped_model_output": bool(use_clipped_model_output)}

        # 2. Timesteps, initial latents and every step's noise, drawn in the sequential loop's order
        scheduler = self.pcr_scheduler(num_inference_steps)  # DDIMPipeline always holds a DDIMScheduler
        latents, noise = self.unconditional_latents(batch_size, generator, scheduler, self.unet.dtype, step_kwargs)

        # 3. Denoise
        image, stats = self.pcr_denoise(
            lambda x, t: self.unet(x, t).sample,
            scheduler,
            latents,
            noise,
            parallel=parallel,
            tolerance=tolerance,
            jacobian=jacobian,
            max_rounds=max_rounds,
            max_memory=max_memory,
            step_kwargs=step_kwargs,
        )

        # 4. Post-process
        image = self.images_from_samples(image, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image, stats)
        return PCRImagePipelineOutput(images=image, stats=stats)
