"""PCRStableDiffusionImg2ImgPipeline: `StableDiffusionImg2ImgPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionImg2ImgPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_img2img.py")`.
"""

from diffusers import StableDiffusionImg2ImgPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


class PCRStableDiffusionImg2ImgPipeline(PCRParentLoopMixin, StableDiffusionImg2ImgPipeline):
    """Image-to-image like `StableDiffusionImg2ImgPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. `strength` keeps the schedule's
    last `int(num_inference_steps * strength)` steps (the parent's `get_timesteps`): the chain starts there, from
    the image's latents noised to its first timestep, with the whole schedule's coefficients.
    """

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        return self.guided_model(call, self.unet_model, latents)
