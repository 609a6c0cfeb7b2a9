"""PCRStableDiffusionPipeline: `StableDiffusionPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion.py")`.
"""

from diffusers import StableDiffusionPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


class PCRStableDiffusionPipeline(PCRParentLoopMixin, StableDiffusionPipeline):
    """Text-to-image like `StableDiffusionPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. One UNet call per round covers
    window x 2 x batch rows: the step's conditioning (prompt embeddings, LCM's `timestep_cond`) repeated per step,
    classifier-free guidance and `guidance_rescale` as the parent applies them. The scheduler can be any that
    `PCRScheduler` supports, SD 1.5's default PNDM and the multistep solvers included.
    """

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        return self.guided_model(call, self.unet_model, latents)
