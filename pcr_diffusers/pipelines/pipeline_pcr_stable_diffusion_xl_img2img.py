"""PCRStableDiffusionXLImg2ImgPipeline: `StableDiffusionXLImg2ImgPipeline` sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_xl_img2img.py")`.
"""

from diffusers import StableDiffusionXLImg2ImgPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin
from pcr_diffusers.pipelines.pipeline_pcr_stable_diffusion_xl import denoising_end_stop


class PCRStableDiffusionXLImg2ImgPipeline(PCRParentLoopMixin, StableDiffusionXLImg2ImgPipeline):
    """Image-to-image like `StableDiffusionXLImg2ImgPipeline` (and SDXL's refiner), with the loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. The chain runs the steps the
    parent runs: from `strength` (or `denoising_start`, for a refiner that continues a base's `denoising_end`) to
    the end, or to `denoising_end`.
    """

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        return self.guided_model(call, self.unet_model, latents)

    def chain_stop(self, arguments, start):
        return denoising_end_stop(self.scheduler, arguments["denoising_end"], start)
