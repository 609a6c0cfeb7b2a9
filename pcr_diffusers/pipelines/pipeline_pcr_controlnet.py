"""PCRStableDiffusionControlNetPipeline: `StableDiffusionControlNetPipeline` (SD 1.x / 2.x with one ControlNet)
sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionControlNetPipeline.from_pipe(controlnet_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_controlnet.py")`.
"""

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.utils.torch_utils import is_compiled_module

from pcr_diffusers.parent_loop import STEP_INPUTS, PCRParentLoopMixin


class ControlledUNet:
    """The ControlNet, then the UNet with its residuals, as one step of the parent's loop calls them, on the rows of
    many steps at once: the `model` that `GuidedModel` calls.

    The parent scales the ControlNet's residuals by `conditioning_scale * controlnet_keep[i]`, where the keep (1 or 0)
    says whether `control_guidance_start/end` cover the step's index `i`: a property of the step's position in the
    schedule, not of its timestep, so this model `takes_positions` (see `DenoisingChain`). The ControlNet runs on
    every row with `conditioning_scale`, and each row's residuals are multiplied by its step's keep: the parent's
    numbers to the bit (times 1, or 0 where the parent's scale is 0), one static shape per call, no host read.
    In guess mode under guidance the ControlNet sees only the conditional rows of each step (its prompt embeddings
    and image are the parent's `B` rows), and the unconditional rows get zero residuals, as in the parent.

    Args:
        unet, controlnet: the pipeline's models.
        keep: `(N,)` the parent's `controlnet_keep` (1.0 or 0.0) per position of the schedule, on the latents'
            device; None where every step keeps the ControlNet.
        conditioning_scale: `controlnet_conditioning_scale`.
        guess_mode: the ControlNet's `guess_mode`.
        conditional_rows: under guess mode and guidance, `B` (the ControlNet sees the second `B` of each step's
            `2B` rows); else None (it sees every row).
    Called `(x, t, positions, controlnet_cond=..., controlnet_hidden_states=..., **unet_conditioning)`: the
    ControlNet's image and prompt embeddings, and the UNet's conditioning of the parent's call.
    """

    takes_positions = True

    def __init__(
        self,
        unet,
        controlnet,
        keep: torch.Tensor | None,
        conditioning_scale: float,
        guess_mode: bool,
        conditional_rows: int | None,
    ):
        self.unet = unet
        self.controlnet = controlnet
        self.keep = keep
        self.conditioning_scale = conditioning_scale
        self.guess_mode = guess_mode
        self.conditional_rows = conditional_rows

    def __call__(self, x, t, positions, *, controlnet_cond, controlnet_hidden_states, **unet_conditioning):
        rows = self.conditional_rows
        control_x, control_t, control_positions = x, t, positions  # (n * 2B, C, H, W), (n * 2B,), (n * 2B,)
        if rows is not None:  # each step's rows are [uncond B; cond B]: the second half, (n * B, ...)
            control_x, control_t, control_positions = (
                r.unflatten(0, (-1, 2, rows))[:, 1].flatten(0, 1) for r in (x, t, positions)
            )
        down, mid = self.controlnet(
            control_x,
            control_t,
            encoder_hidden_states=controlnet_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=self.conditioning_scale,
            guess_mode=self.guess_mode,
            return_dict=False,
        )
        residuals = [*down, mid]
        if self.keep is not None:
            keep = self.keep[control_positions].to(mid.dtype)  # (rows,), 1 or 0
            residuals = [r * keep.reshape(-1, *([1] * (r.ndim - 1))) for r in residuals]
        if rows is not None:  # zeros for the unconditional rows: (n * B, ...) -> (n, 2, B, ...) -> (n * 2B, ...)
            residuals = [r.unflatten(0, (-1, 1, rows)) for r in residuals]
            residuals = [torch.cat([torch.zeros_like(r), r], dim=1).flatten(0, 2) for r in residuals]
        return self.unet(
            x,
            t,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
            **unet_conditioning,
        )[0]


class PCRStableDiffusionControlNetPipeline(PCRParentLoopMixin, StableDiffusionControlNetPipeline):
    """Text-to-image with a ControlNet like `StableDiffusionControlNetPipeline`, with the denoising loop solved in
    parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. Each round runs the ControlNet and
    the UNet once on window x 2 x batch rows (the control image repeated per step), with
    `controlnet_conditioning_scale`, `control_guidance_start/end` (per step index, see `ControlledUNet`) and guess
    mode as in the parent. One `ControlNetModel`: a `MultiControlNetModel` is refused with a clear error.
    """

    denoisers = ("controlnet", "unet")
    # the ControlNet's scale changes with the step (the keep), and the UNet gets that step's residuals
    varying_inputs = (
        *STEP_INPUTS,
        "conditioning_scale",
        "down_block_additional_residuals",
        "mid_block_additional_residual",
    )

    def check_call(self, arguments):
        super().check_call(arguments)
        controlnet = self.controlnet._orig_mod if is_compiled_module(self.controlnet) else self.controlnet
        if not isinstance(controlnet, ControlNetModel):
            raise ValueError(
                f"{type(self).__name__} supports one `ControlNetModel`, got a {type(controlnet).__name__}: several "
                f"ControlNets are not implemented. Use StableDiffusionControlNetPipeline."
            )

    def chain_model(self, calls, latents, arguments):
        control, unet = calls
        scale, start, end = (
            value[0] if isinstance(value, (list, tuple)) else value
            for value in (
                arguments["controlnet_conditioning_scale"],
                arguments["control_guidance_start"],
                arguments["control_guidance_end"],
            )
        )
        n = len(self.scheduler.timesteps)
        keep = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]  # the parent's controlnet_keep
        guess_mode = control.kwargs["guess_mode"]
        model = ControlledUNet(
            self.unet,
            self.controlnet,
            None if all(keep) else torch.tensor(keep, device=latents.device),
            scale,
            guess_mode,
            latents.shape[0] if guess_mode and self.do_classifier_free_guidance else None,
        )
        return self.guided_model(
            unet,
            model,
            latents,
            controlnet_cond=control.kwargs["controlnet_cond"],
            controlnet_hidden_states=control.kwargs["encoder_hidden_states"],
        )

    def dummy_output(self, call, module):
        if call.name == "controlnet":  # residuals the UNet's stand-in ignores
            return [], torch.zeros(1)
        return super().dummy_output(call, module)
