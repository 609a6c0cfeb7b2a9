"""PCRStableDiffusionXLImg2ImgPipeline: `StableDiffusionXLImg2ImgPipeline` sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionXLImg2ImgPipeline.from_pipe(sdxl_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_xl_img2img.py")`.
"""

from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


def is_denoising_fraction(value) -> bool:
    """The parent's test for `denoising_start` / `denoising_end` values it acts on (others are ignored)."""
    return isinstance(value, float) and 0 < value < 1


class PCRStableDiffusionXLImg2ImgPipeline(PCRTextToImageMixin, StableDiffusionXLImg2ImgPipeline):
    """Image-to-image like `StableDiffusionXLImg2ImgPipeline` (and SDXL's refiner), with the loop solved in parallel.

    The chain runs the steps the parent runs: from `strength` (or `denoising_start`, for a refiner that continues
    a base's `denoising_end`, from the given latents un-noised) to the end, or to `denoising_end`. Prompt encoding
    (both text encoders), image encoding, the added time ids (with aesthetic scores) and decoding are the parent's;
    for the same `generator` the result equals the parent's up to the tolerance.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
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
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""Generates images from an image and text.

        Args:
            prompt ... negative_aesthetic_score, clip_skip: as in `StableDiffusionXLImg2ImgPipeline`
                (`output_type` one of `"pil"`, `"np"`, `"pt"`, `"latent"`). Steps that leave nothing to run
                (`strength`, `denoising_start`, `denoising_end`) are an error.
            parallel, tolerance, jacobian, max_rounds, max_memory: the window solver's, as in `PCRDDPMPipeline`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the parent, but called after the solve,
                in step order, with each step's accepted latents: a callback can only observe (`StepEndCallback`;
                one that would steer the parent's later steps is an error).
            ip_adapter_image, ip_adapter_image_embeds, callback, callback_steps: not supported (a clear error).

        Returns:
            `StableDiffusionXLPipelineOutput` with the statistics as its attribute `.stats`, or the parent's tuple
            `(images,)`; `pipeline.stats` holds them too, per thread.
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
        self.check_inputs(
            prompt,
            prompt_2,
            strength,
            num_inference_steps,
            None,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        start, end = (value if is_denoising_fraction(value) else None for value in (denoising_start, denoising_end))
        if start is not None and end is not None and start >= end:
            raise ValueError(
                f"`denoising_start`: {start} cannot be larger than or equal to `denoising_end`: {end} when using "
                f"type float."
            )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._denoising_start = denoising_start
        self._interrupt = False
        device = self._execution_device

        # 2. Timesteps: from `strength` or `denoising_start` on, up to `denoising_end` (no model call yet)
        scheduler, steps = self.pcr_image_to_image_timesteps(
            num_inference_steps, strength, timesteps, sigmas, denoising_start=start
        )
        if end is not None:
            # the chain runs (and draws noise for) the first kept steps only, with the whole schedule's coefficients
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - end)))
            steps = range(steps.start, steps.start + int((scheduler.timesteps[steps.start :] >= cutoff).sum()))
            if not steps:
                raise ValueError(f"`denoising_end`={end} leaves no denoising step after `strength`={strength}.")
            self._num_timesteps = len(steps)

        # 3. Encode the prompt with both text encoders
        with TEXT_ENCODING_LOCK:
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
                self.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    device=device,
                    num_images_per_prompt=num_images_per_prompt,
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    lora_scale=(cross_attention_kwargs or {}).get("scale"),
                    clip_skip=clip_skip,
                )
            )

        # 4. The image's latents, noised to the first kept timestep (not after a base's `denoising_end`), then
        #    every step's noise, in the sequential loop's order
        image = self.image_processor.preprocess(image)
        if latents is None:
            latent_timestep = scheduler.timesteps[steps.start : steps.start + 1].repeat(batch_size)
            latents = self.prepare_latents(
                image,
                latent_timestep,
                batch_size,
                1,  # `batch_size` counts the images per prompt already
                prompt_embeds.dtype,
                device,
                generator,
                add_noise=denoising_start is None,
            )
        step_kwargs, noise, timestep_cond = self.unet_step_inputs(
            scheduler, latents, generator, eta, batch_size, steps
        )

        # 5. Added conditioning: pooled text embeddings and size/crop/aesthetic time ids, negative rows first
        height, width = (size * self.vae_scale_factor for size in latents.shape[-2:])
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        add_time_ids, add_neg_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            aesthetic_score,
            negative_aesthetic_score,
            negative_original_size or original_size,
            negative_crops_coords_top_left,
            negative_target_size or target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=(
                int(pooled_prompt_embeds.shape[-1])
                if self.text_encoder_2 is None
                else self.text_encoder_2.config.projection_dim
            ),
        )
        add_text_embeds = pooled_prompt_embeds
        add_time_ids = add_time_ids.repeat(batch_size, 1)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([add_neg_time_ids.repeat(batch_size, 1), add_time_ids])
        conditioning = {
            "encoder_hidden_states": prompt_embeds.to(device),
            "timestep_cond": timestep_cond,
            "added_cond_kwargs": {"text_embeds": add_text_embeds.to(device), "time_ids": add_time_ids.to(device)},
        }

        # 6. Denoise: one UNet call per round covers window x 2 x batch; then the callbacks, step by step
        step_end = self.step_end_callback(
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=conditioning["encoder_hidden_states"],
            add_text_embeds=conditioning["added_cond_kwargs"]["text_embeds"],
            add_time_ids=conditioning["added_cond_kwargs"]["time_ids"],
        )
        latents, stats = self.guided_denoise(
            self.unet_model,
            conditioning,
            scheduler,
            latents,
            noise,
            options,
            guidance_rescale=guidance_rescale,
            step_kwargs=step_kwargs,
            steps=steps,
            step_end=step_end,
        )

        # 7. Decode (upcasting a float16 VAE that asks for it) and post-process, as the parent does
        if output_type != "latent":
            image = self.image_processor.postprocess(self.decode_sdxl_latents(latents), output_type=output_type)
        else:  # this parent also watermarks latents (a no-op under 256 pixels wide)
            image = latents if self.watermark is None else self.watermark.apply_watermark(latents)
        return self.pcr_output(StableDiffusionXLPipelineOutput(images=image), stats, return_dict)
