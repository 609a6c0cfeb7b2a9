"""PCRStableDiffusion3Pipeline: `StableDiffusion3Pipeline` (flow matching, `SD3Transformer2DModel`) sampled in
parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusion3Pipeline.from_pipe(sd3_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_3.py")`.
"""

from diffusers import StableDiffusion3Pipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


class PCRStableDiffusion3Pipeline(PCRParentLoopMixin, StableDiffusion3Pipeline):
    """Text-to-image like `StableDiffusion3Pipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. One transformer call per round
    covers window x 2 x batch rows (classifier-free guidance as the parent applies it). With `stochastic_sampling`
    the parent's scheduler draws its noise from the global RNG (its `step` gets no generator), and so do we.
    Skip-layer guidance, an extra call at some steps, is refused.
    """

    denoisers = ("transformer",)

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        return self.guided_model(call, self.transformer_model, latents)
