"""PCRDiTPipeline: `DiTPipeline` (class-conditional `DiTTransformer2DModel` with classifier-free guidance) sampled in
parallel over time.

A diffusers community pipeline: use it as `PCRDiTPipeline.from_pipe(dit_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_dit.py")`.
"""

import torch
from diffusers import DiTPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin
from pcr_diffusers.schedulers import PCRScheduler
from pcr_diffusers.text_to_image import GuidedModel


class PCRDiTPipeline(PCRParentLoopMixin, DiTPipeline):
    """Class-conditional generation like `DiTPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same seed the result equals the parent's up to the tolerance. Under guidance (`guidance_scale > 1`) the
    parent's loop carries two copies of the latents `(2B, C, H, W)`, evaluates them with the labels and then the
    null class, guides the noise channels as `uncond + s * (cond - uncond)` and keeps the first copy; the chain's
    state is that first copy (`chain_sample`), and one transformer call per round covers window x 2 x batch rows.
    With a learned variance (`out_channels = 2 * in_channels`) the scheduler gets the noise channels, as in the
    parent. Its scheduler steps draw their noise from the global RNG (the parent passes no generator), for all
    2B rows, and so do we. The parent passes the scaled model input to `scheduler.step`, so schedulers that scale
    it (Euler, LMS, ...) are refused.
    """

    denoisers = ("transformer",)

    def check_call(self, arguments):
        super().check_call(arguments)
        scheduler = PCRScheduler.from_scheduler(self.scheduler)
        scheduler.set_timesteps(2)
        sample = torch.ones(1)
        if not torch.equal(scheduler.scale_model_input(sample, scheduler.timesteps[0]), sample):
            raise ValueError(
                f"{type(self).__name__} takes schedulers that do not scale the model input (DDPM, DDIM, DPM-Solver, "
                f"UniPC, DEIS, PNDM), got {type(self.scheduler).__name__}: DiTPipeline passes the scaled input to "
                f"`scheduler.step`, which a parallel solve of the schedule's own steps would not reproduce."
            )

    def chain_sample(self, sample, arguments):
        return sample[: len(sample) // 2] if arguments["guidance_scale"] > 1 else sample

    def loop_sample(self, state, arguments):
        return torch.cat([state, state]) if arguments["guidance_scale"] > 1 else state

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        scale = arguments["guidance_scale"] if arguments["guidance_scale"] > 1 else None
        labels = call.kwargs["class_labels"]  # (2B,) under guidance: the labels, then the null class
        if scale is not None:
            labels = torch.cat([labels[len(latents) :], labels[: len(latents)]])  # negative rows first
        conditioning = {**call.conditioning(self.varying_inputs), "class_labels": labels}
        return GuidedModel(self.dit_model, conditioning, len(latents), scale)

    def dit_model(self, x, t, class_labels):
        """One transformer call as the parent's loop makes it; the noise channels of a learned-variance output."""
        output = self.transformer(x, timestep=t, class_labels=class_labels).sample
        channels = self.transformer.config.in_channels
        return output[:, :channels] if self.transformer.config.out_channels // 2 == channels else output
