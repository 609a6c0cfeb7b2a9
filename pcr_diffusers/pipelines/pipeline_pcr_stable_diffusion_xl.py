"""PCRStableDiffusionXLPipeline: `StableDiffusionXLPipeline` sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionXLPipeline.from_pipe(sdxl_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_xl.py")`.
"""

from diffusers import StableDiffusionXLPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


def denoising_end_stop(scheduler, denoising_end, start: int = 0) -> int:
    """Where the SDXL parents' loop stops in the schedule with `denoising_end` (base + refiner): after the steps from
    `start` at or above its cutoff timestep; at the end without one (or with a value the parents ignore)."""
    if denoising_end is None or not isinstance(denoising_end, float) or not 0 < denoising_end < 1:
        return len(scheduler.timesteps)
    num_train_timesteps = scheduler.config.num_train_timesteps
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    return start + int((scheduler.timesteps[start:] >= cutoff).sum())


class PCRStableDiffusionXLPipeline(PCRParentLoopMixin, StableDiffusionXLPipeline):
    """Text-to-image like `StableDiffusionXLPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. One UNet call per round covers
    window x 2 x batch rows, with the pooled text embeddings and size/crop time ids of each step's call repeated per
    step. `denoising_end` (base + refiner) solves the first steps only, as the parent runs them.
    """

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        return self.guided_model(call, self.unet_model, latents)

    def chain_stop(self, arguments, start):
        return denoising_end_stop(self.scheduler, arguments["denoising_end"])
