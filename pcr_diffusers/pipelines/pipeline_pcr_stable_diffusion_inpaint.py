"""PCRStableDiffusionInpaintPipeline: `StableDiffusionInpaintPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionInpaintPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_inpaint.py")`.
"""

import copy
from collections.abc import Callable

import torch
from diffusers import StableDiffusionInpaintPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin
from pcr_diffusers.schedulers import PCRSchedulerMixin


def keep_known_region(
    scheduler: PCRSchedulerMixin,
    image_latents: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    steps: range,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What a step of a 4-channel inpainting UNet does besides `scheduler.step`, as `DenoisingChain`'s `after_step`.

    After step l the parent puts the known region back: `x_{l+1} = (1 - m) * known_l + m * step_l(x_l)`, where `m`
    `(B, 1, H, W)` is 1 where the image is repainted, and `known_l` is the image's latents `(B, C, H, W)` noised with
    the initial `noise` to the next timestep (not noised after the schedule's last step). Every `known_l` is computed
    once, `(L, B, C, H, W)`, with the scheduler's own `add_noise` as the parent calls it.
    """
    noising = copy.copy(scheduler)  # its begin index changes below; the call's scheduler keeps its own
    if hasattr(noising, "_step_index"):
        noising._step_index = None  # noised to the begin index below, as by a scheduler that has taken no step
    known = []
    for position in steps:
        if position + 1 == len(scheduler.timesteps):
            known.append(image_latents)
            continue
        # after step `position` the parent's scheduler has taken `position + 1` steps, and schedulers with a step
        # index noise to that index; one that has taken no step (ours) reads its begin index instead
        if hasattr(noising, "set_begin_index"):
            noising.set_begin_index(position + 1)
        known.append(noising.add_noise(image_latents, noise, scheduler.timesteps[position + 1 : position + 2]))
    known = torch.stack(known)  # (L, B, C, H, W)
    return lambda ls, x_next: (1 - mask) * known[ls] + mask * x_next


class PCRStableDiffusionInpaintPipeline(PCRParentLoopMixin, StableDiffusionInpaintPipeline):
    """Inpainting like `StableDiffusionInpaintPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. What a step does besides the
    scheduler's step is part of the chain, so residuals and Jacobians include it: with a 4-channel UNet the known
    region is put back after every step (`keep_known_region`, from the image latents, noise and mask the parent
    prepared); a 9-channel inpainting UNet reads the mask and the masked image's latents beside the latents, the
    channels of step 0's call after the latents', repeated for every step of a round. `strength` < 1 starts the
    chain mid-schedule, as in `PCRStableDiffusionImg2ImgPipeline`.
    """

    recorded_methods = ("prepare_latents", "prepare_mask_latents")

    def chain_model(self, calls, latents, arguments):
        (call,) = calls
        if self.unet.config.in_channels == 4:
            return self.guided_model(call, self.unet_model, latents)
        # step 0's UNet input: the scaled latents, then the mask and the masked image's latents, (2B, 9, h, w)
        inpainting = call.args[0][:, latents.shape[1] :]
        return self.guided_model(call, self.unet_inpaint_model, latents, inpainting=inpainting)

    def chain_after_step(self, steps, noise, latents, recorded):
        if self.unet.config.in_channels != 4:
            return None
        _, initial_noise, image_latents = recorded["prepare_latents"]
        mask, _ = recorded["prepare_mask_latents"]
        init_mask = mask.chunk(2)[0] if self.do_classifier_free_guidance else mask
        return keep_known_region(self.scheduler, image_latents, initial_noise, init_mask, steps)

    def unet_inpaint_model(self, x, t, inpainting, **conditioning):
        """One call of a 9-channel inpainting UNet as the parent's loop makes it: the scaled latents, then the mask
        and the masked image's latents (`inpainting`) along the channels."""
        return self.unet_model(torch.cat([x, inpainting], dim=1), t, **conditioning)
