"""PCRStableDiffusionXLPipeline: `StableDiffusionXLPipeline` sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionXLPipeline.from_pipe(sdxl_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_xl.py")`.
"""

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


class PCRStableDiffusionXLPipeline(PCRTextToImageMixin, StableDiffusionXLPipeline):
    """Text-to-image like `StableDiffusionXLPipeline`, with the denoising loop solved in parallel.

    Prompt encoding (both text encoders), the added time ids, latents and decoding are the parent's; for the same
    `generator` the result equals the parent's up to the tolerance, with classifier-free guidance inside the
    batched UNet call. `denoising_end` (base + refiner) runs the first steps only, as in the parent.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
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
        r"""Generates images from text.

        Args:
            prompt ... negative_target_size, clip_skip: as in `StableDiffusionXLPipeline` (`output_type` one of
                `"pil"`, `"np"`, `"pt"`, `"latent"`).
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
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            None,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompt with both text encoders
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

        # 3. Timesteps (the first ones only, with `denoising_end`), latents and every step's noise
        scheduler = self.pcr_timesteps(num_inference_steps, timesteps, sigmas)
        steps = range(len(scheduler.timesteps))
        if denoising_end is not None and isinstance(denoising_end, float) and 0 < denoising_end < 1:
            num_train_timesteps = scheduler.config.num_train_timesteps
            cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
            # the chain runs (and draws noise for) the first steps only, with the whole schedule's coefficients
            steps = range(int((scheduler.timesteps >= cutoff).sum()))
            self._num_timesteps = len(steps)
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        step_kwargs, noise, timestep_cond = self.unet_step_inputs(
            scheduler, latents, generator, eta, batch_size, steps
        )

        # 4. Added conditioning: pooled text embeddings and size/crop time ids, negative rows first
        projection_dim = (
            int(pooled_prompt_embeds.shape[-1])
            if self.text_encoder_2 is None
            else self.text_encoder_2.config.projection_dim
        )
        add_time_ids = self._get_add_time_ids(
            original_size or (height, width),
            crops_coords_top_left,
            target_size or (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=projection_dim,
            )
        add_text_embeds = pooled_prompt_embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])
        conditioning = {
            "encoder_hidden_states": prompt_embeds.to(device),
            "timestep_cond": timestep_cond,
            "added_cond_kwargs": {
                "text_embeds": add_text_embeds.to(device),
                "time_ids": add_time_ids.to(device).repeat(batch_size, 1),  # the parent's row order, kept
            },
        }

        # 5. Denoise: one UNet call per round covers window x 2 x batch; then the callbacks, step by step
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

        # 6. Decode (upcasting a float16 VAE that asks for it) and post-process, as the parent does
        image = latents
        if output_type != "latent":
            image = self.image_processor.postprocess(self.decode_sdxl_latents(latents), output_type=output_type)
        return self.pcr_output(StableDiffusionXLPipelineOutput(images=image), stats, return_dict)
