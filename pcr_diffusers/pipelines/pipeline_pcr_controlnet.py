"""PCRStableDiffusionControlNetPipeline: `StableDiffusionControlNetPipeline` (SD 1.x / 2.x with one ControlNet)
sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionControlNetPipeline.from_pipe(controlnet_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_controlnet.py")`.
"""

from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import is_compiled_module

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


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
        cross_attention_kwargs: the UNet's, as the parent passes them.
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
        cross_attention_kwargs: dict | None,
    ):
        self.unet = unet
        self.controlnet = controlnet
        self.keep = keep
        self.conditioning_scale = conditioning_scale
        self.guess_mode = guess_mode
        self.conditional_rows = conditional_rows
        self.cross_attention_kwargs = cross_attention_kwargs

    def __call__(
        self, x, t, positions, *, encoder_hidden_states, controlnet_cond, controlnet_hidden_states, timestep_cond
    ):
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
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self.cross_attention_kwargs,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class PCRStableDiffusionControlNetPipeline(PCRTextToImageMixin, StableDiffusionControlNetPipeline):
    """Text-to-image with a ControlNet like `StableDiffusionControlNetPipeline`, with the denoising loop solved in
    parallel.

    Prompt encoding, the control image, latents and decoding are the parent's; for the same `generator` the result
    equals the parent's up to the tolerance. Each round runs the ControlNet and the UNet once on window x 2 x batch
    rows (the control image repeated per step), with `controlnet_conditioning_scale`, `control_guidance_start/end`
    (per step index, see `ControlledUNet`) and guess mode as in the parent. One `ControlNetModel`: a
    `MultiControlNetModel` is refused with a clear error.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's default)
        *,
        parallel: int | str = DEFAULT_PARALLEL,
        tolerance: float = DEFAULT_TOLERANCE,
        jacobian: str = "auto",
        max_rounds: int | None = None,
        max_memory: int | str | None = None,
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""Generates images from text, guided by a control image.

        Args:
            prompt ... callback_on_step_end_tensor_inputs: as in `StableDiffusionControlNetPipeline`
                (`num_inference_steps` may be None with custom `timesteps` or `sigmas`).
            parallel, tolerance, jacobian, max_rounds, max_memory: the window solver's, as in `PCRDDPMPipeline`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the parent, but called after the solve,
                in step order, with each step's accepted latents: a callback can only observe (`StepEndCallback`;
                one that would steer the parent's later steps is an error).
            ip_adapter_image, ip_adapter_image_embeds, callback, callback_steps: not supported (a clear error).

        Returns:
            `StableDiffusionPipelineOutput` with the statistics as its attribute `.stats`, or the parent's tuple
            `(images, nsfw_content_detected)`; `pipeline.stats` holds them too, per thread.
        """
        # 1. Check inputs, before any model call; the call runs on its own copy of the pipeline and scheduler
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        num_inference_steps = self.check_text_to_image_inputs(
            num_inference_steps,
            timesteps is not None or sigmas is not None,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            **kwargs,
        )
        controlnet = self.controlnet._orig_mod if is_compiled_module(self.controlnet) else self.controlnet
        if not isinstance(controlnet, ControlNetModel):
            raise ValueError(
                f"{type(self).__name__} supports one `ControlNetModel`, got a {type(controlnet).__name__}: several "
                f"ControlNets are not implemented. Use StableDiffusionControlNetPipeline."
            )
        self = self.for_text_to_image_call()  # noqa: PLW0642 (the parent keeps per-call state on the pipeline)
        callback_on_step_end_tensor_inputs = self.step_end_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        # the parent's alignment of the control guidance window, for one ControlNet
        if not isinstance(control_guidance_start, list):
            n = len(control_guidance_end) if isinstance(control_guidance_end, list) else 1
            control_guidance_start = n * [control_guidance_start]
        if not isinstance(control_guidance_end, list):
            control_guidance_end = len(control_guidance_start) * [control_guidance_end]
        self.check_inputs(
            prompt,
            image,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            callback_on_step_end_tensor_inputs,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        guess_mode = guess_mode or controlnet.config.global_pool_conditions
        conditional_only = guess_mode and self.do_classifier_free_guidance  # the ControlNet sees the cond rows only
        image = self.prepare_image(
            image=image,
            width=width,
            height=height,
            batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            dtype=controlnet.dtype,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            guess_mode=guess_mode,
        )
        height, width = image.shape[-2:]

        # 2. Encode the prompt: negative embeddings first, as the sequential loop batches them
        with TEXT_ENCODING_LOCK:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                lora_scale=(cross_attention_kwargs or {}).get("scale"),
                clip_skip=clip_skip,
            )
        controlnet_prompt_embeds = prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            controlnet_prompt_embeds = controlnet_prompt_embeds if conditional_only else prompt_embeds

        # 3. Timesteps, initial latents and every step's noise, drawn in the sequential loop's order; which steps
        # keep the ControlNet (the parent's `controlnet_keep`)
        scheduler = self.pcr_timesteps(num_inference_steps, timesteps, sigmas)
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        step_kwargs, noise, timestep_cond = self.unet_step_inputs(scheduler, latents, generator, eta, batch_size)
        n, start, end = len(scheduler.timesteps), control_guidance_start[0], control_guidance_end[0]
        keep = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]

        # 4. Denoise: one ControlNet and one UNet call per round cover window x 2 x batch; then the callbacks
        model = ControlledUNet(
            self.unet,
            self.controlnet,
            None if all(keep) else torch.tensor(keep, device=device),
            controlnet_conditioning_scale,
            guess_mode,
            batch_size if conditional_only else None,
            cross_attention_kwargs,
        )
        conditioning = {
            "encoder_hidden_states": prompt_embeds,
            "timestep_cond": timestep_cond,
            "controlnet_cond": image,
            "controlnet_hidden_states": controlnet_prompt_embeds,
        }
        step_end = self.step_end_callback(
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            image=image,
        )
        latents, stats = self.guided_denoise(
            model, conditioning, scheduler, latents, noise, options, step_kwargs=step_kwargs, step_end=step_end
        )

        # 5. Decode, check safety and post-process, as the parent does
        image, has_nsfw_concept = self.decode_with_safety_checker(latents, output_type, generator)
        output = StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
        return self.pcr_output(output, stats, return_dict)
