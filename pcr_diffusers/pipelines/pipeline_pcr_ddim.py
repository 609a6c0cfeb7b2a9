"""PCRDDIMPipeline: `DDIMPipeline` sampled in parallel over time (Newton + parallel cyclic reduction).

A diffusers community pipeline: use it as `PCRDDIMPipeline.from_pipe(ddim_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_ddim.py")`.
"""

import torch
from diffusers import DDIMPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from pcr_diffusers.pipeline_utils import PCRPipelineMixin
from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions


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
    ) -> ImagePipelineOutput | tuple:
        r"""Generates images.

        Args:
            batch_size, generator, eta, num_inference_steps, use_clipped_model_output, output_type, return_dict:
                as in `DDIMPipeline`.
            parallel, tolerance, jacobian, max_rounds, max_memory: as in `PCRDDPMPipeline`.

        Returns:
            As `PCRDDPMPipeline`: the parent's output with `.stats`, or the parent's tuple `(images,)`.
        """
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        step_kwargs = {"eta": eta, "use_clipped_model_output": bool(use_clipped_model_output)}
        # DDIMPipeline always holds a DDIMScheduler, whose step takes these
        return self.generate_unconditional(
            batch_size, generator, num_inference_steps, output_type, return_dict, options, step_kwargs
        )
