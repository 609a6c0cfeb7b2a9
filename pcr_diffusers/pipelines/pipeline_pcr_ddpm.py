"""PCRDDPMPipeline: `DDPMPipeline` sampled in parallel over time (Newton + parallel cyclic reduction).

A diffusers community pipeline: use it as `PCRDDPMPipeline.from_pipe(ddpm_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_ddpm.py")`.
"""

import torch
from diffusers import DDPMPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from pcr_diffusers.pipeline_utils import PCRPipelineMixin
from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions


class PCRDDPMPipeline(PCRPipelineMixin, DDPMPipeline):
    """Unconditional image generation like `DDPMPipeline`, with the denoising loop solved in parallel.

    For the same `generator` the images equal `DDPMPipeline`'s up to the tolerance: all noise is drawn up front in
    the order the sequential loop draws it. The scheduler can be any supported one (DDPM, DDIM, Euler, Euler
    ancestral, flow-matching Euler); it is used as the sequential loop would use it (input scaling, initial sigma).
    """

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
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
            batch_size, generator, num_inference_steps, output_type, return_dict: as in `DDPMPipeline`.
            parallel (`int` or `"auto"`, defaults to 64): the window, how many consecutive steps each round
                evaluates in one model call; 1 runs the plain sequential loop; `"auto"` the largest window that fits
                the memory budget (see `max_memory`).
            tolerance (`float`, defaults to 3e-3): how far the result may be from the sequential one, relative to
                the state's size: each step is accepted only when its residual `||Phi_i(x_i) - x_{i+1}||_inf` at its
                final input is within `tolerance / N`; see `pcr_diffusers.sampling.denoise_parallel`. With the
                default, the shipped model's images stayed within 1.9e-3 of the sequential ones in [0, 1] pixels
                (half an 8-bit gray level).
            jacobian (`str`, defaults to `"auto"`): `"auto"`, `"secant"`, `"denoiser"`, `"scheduler"` or `"identity"`
                (ParaDiGMS' Picard iteration), or a `pcr_diffusers.core.Jacobian`; see
                `pcr_diffusers.sampling.denoise_parallel`.
            max_rounds (`int`, *optional*): the most parallel rounds; the rest is finished sequentially (warned, and
                recorded in `stats.sequential_steps`).
            max_memory (`int` or `str`, *optional*): the memory sampling may use (bytes, or e.g. `"2GB"`); default:
                the free CUDA memory or available RAM. With it or `parallel="auto"`, one probe step measures a
                step's memory and the window is fitted to the budget (shrunk with a log message, never an
                out-of-memory error from the window).

        Returns:
            `ImagePipelineOutput` (PIL images for `output_type="pil"`, else a numpy array, as `DDPMPipeline`) with
            the statistics as its attribute `.stats`, or the parent's tuple `(images,)`; `pipeline.stats` holds them
            too, per thread.
        """
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        return self.generate_unconditional(
            batch_size, generator, num_inference_steps, output_type, return_dict, options
        )
