"""PCRStableDiffusionInpaintPipeline: `StableDiffusionInpaintPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionInpaintPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_inpaint.py")`.
"""

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import AsymmetricAutoencoderKL, StableDiffusionInpaintPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.schedulers import PCRSchedulerMixin
from pcr_diffusers.text_to_image import PCRTextToImageMixin


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


class PCRStableDiffusionInpaintPipeline(PCRTextToImageMixin, StableDiffusionInpaintPipeline):
    """Inpainting like `StableDiffusionInpaintPipeline`, with the denoising loop solved in parallel.

    What a step does besides the scheduler's step is part of the chain, so residuals and Jacobians include it: with
    a 4-channel UNet the known region is put back after every step (`keep_known_region`); a 9-channel inpainting
    UNet reads the mask and the masked image's latents beside the latents (`unet_inpaint_model`), per-sample
    conditioning repeated for every step of the window. `strength` < 1 starts the chain mid-schedule, as in
    `PCRStableDiffusionImg2ImgPipeline`. For the same `generator` the result equals the parent's up to the tolerance.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int = None,
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
        r"""Repaints the masked region of an image, guided by text.

        Args:
            prompt, image, mask_image, masked_image_latents, height, width, padding_mask_crop, strength,
            num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt, num_images_per_prompt, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type (`"pil"`, `"np"`, `"pt"` or
            `"latent"`), return_dict, cross_attention_kwargs, clip_skip: as in `StableDiffusionInpaintPipeline`
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
        self = self.for_text_to_image_call()  # noqa: PLW0642 (the parent keeps per-call state on the pipeline)
        callback_on_step_end_tensor_inputs = self.step_end_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            image,
            mask_image,
            height,
            width,
            strength,
            None,
            output_type,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            padding_mask_crop=padding_mask_crop,
        )
        num_channels_unet = self.unet.config.in_channels
        if num_channels_unet not in (4, 9):
            raise ValueError(
                f"The unet {type(self.unet)} should have either 4 or 9 input channels, not {num_channels_unet}."
            )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Timesteps: the last steps of the schedule, as `strength` keeps them (no model call yet)
        scheduler, steps = self.pcr_image_to_image_timesteps(num_inference_steps, strength, timesteps, sigmas)
        # The parent refuses `strength` keeping none of `num_inference_steps`, even where a timestep is left to run
        # (PNDM's schedule has one more timestep than steps): its `get_timesteps` count, not the timesteps kept.
        requested = num_inference_steps if timesteps is None and sigmas is None else len(scheduler.timesteps)
        if min(int(requested * strength), requested) < 1:
            raise ValueError(
                f"After adjusting the num_inference_steps by strength parameter: {strength}, the number of pipeline "
                "steps is 0 which is < 1 and not appropriate for this pipeline."
            )

        # 3. Encode the prompt: negative embeddings first, as the sequential loop batches them
        prompt_embeds, negative_prompt_embeds = self.sd_prompt_embeds(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds
        )

        # 4. Latents, the image's latents, the mask and masked image's latents, then every step's noise, as the
        #    parent draws them
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        original_image = image
        init_image = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        latent_timestep = scheduler.timesteps[steps.start : steps.start + 1].repeat(batch_size)
        latents, noise, *image_latents = self.prepare_latents(
            batch_size,
            self.vae.config.latent_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
            image=init_image,
            timestep=latent_timestep,
            is_strength_max=strength == 1.0,
            return_noise=True,
            return_image_latents=num_channels_unet == 4,
        )
        mask_condition = self.mask_processor.preprocess(
            mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crops_coords
        )
        masked_image = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition,
            masked_image,
            batch_size,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            self.do_classifier_free_guidance,
        )
        channels = latents.shape[1] + mask.shape[1] + masked_image_latents.shape[1]
        if num_channels_unet == 9 and channels != 9:
            raise ValueError(
                f"The 9-channel `unet` takes the latents, the mask and the masked image's latents, which have "
                f"{latents.shape[1]} + {mask.shape[1]} + {masked_image_latents.shape[1]} = {channels} channels: "
                f"check `pipeline.unet`'s config and `mask_image`, `image` or `masked_image_latents`."
            )
        step_kwargs, noise_per_step, timestep_cond = self.unet_step_inputs(
            scheduler, latents, generator, eta, batch_size, steps
        )

        # 5. Denoise: one UNet call per round covers window x 2 x batch; a 4-channel UNet's step puts the known
        #    region back, a 9-channel UNet reads the mask and the masked image beside the latents; then the
        #    callbacks, step by step
        conditioning = {"encoder_hidden_states": prompt_embeds, "timestep_cond": timestep_cond}
        model, after_step = self.unet_model, None
        if num_channels_unet == 4:
            init_mask = mask.chunk(2)[0] if self.do_classifier_free_guidance else mask
            after_step = keep_known_region(scheduler, image_latents[0], noise, init_mask, steps)
        else:
            model = self.unet_inpaint_model
            conditioning.update(mask=mask, masked_image_latents=masked_image_latents)
        step_end = self.step_end_callback(
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            mask=mask,
            masked_image_latents=masked_image_latents,
        )
        latents, stats = self.guided_denoise(
            model,
            conditioning,
            scheduler,
            latents,
            noise_per_step,
            options,
            step_kwargs=step_kwargs,
            steps=steps,
            after_step=after_step,
            step_end=step_end,
        )

        # 6. Decode, check safety and post-process, as the parent does
        condition_kwargs = {}
        if output_type != "latent" and isinstance(self.vae, AsymmetricAutoencoderKL):
            init_image = init_image.to(device=device, dtype=masked_image_latents.dtype)
            mask_condition = mask_condition.to(device=device, dtype=masked_image_latents.dtype)
            self._encode_vae_image(init_image, generator=generator)  # unused, but it draws: the decoder's draws follow
            condition_kwargs = {"image": init_image, "mask": mask_condition}
        image, has_nsfw_concept = self.decode_with_safety_checker(latents, output_type, generator, **condition_kwargs)
        if padding_mask_crop is not None:
            image = [self.image_processor.apply_overlay(mask_image, original_image, i, crops_coords) for i in image]
        output = StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
        return self.pcr_output(output, stats, return_dict)

    def unet_inpaint_model(self, x, t, mask, masked_image_latents, **conditioning):
        """One call of a 9-channel inpainting UNet as the sequential loop makes it: the scaled latents, then the
        mask and the masked image's latents along the channels."""
        return self.unet_model(torch.cat([x, mask, masked_image_latents], dim=1), t, **conditioning)
