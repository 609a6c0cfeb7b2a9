"""PCRStableDiffusionPipeline: `StableDiffusionPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion.py")`.
"""

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


class PCRStableDiffusionPipeline(PCRTextToImageMixin, StableDiffusionPipeline):
    """Text-to-image like `StableDiffusionPipeline`, with the denoising loop solved in parallel.

    Prompt encoding, latents and decoding are the parent's; for the same `generator` the result equals the parent's
    up to the tolerance: every step's noise is drawn up front in the order the sequential loop draws it, and
    classifier-free guidance runs inside the batched model call (window x 2 x batch rows per round).
    The scheduler can be any `PCRScheduler` supports, SD 1.5's default PNDM and the multistep solvers included.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
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
        r"""Generates images from text.

        Args:
            prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
            num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type
            (`"pil"`, `"np"`, `"pt"` or `"latent"`), return_dict, cross_attention_kwargs, guidance_rescale,
            clip_skip: as in `StableDiffusionPipeline` (`num_inference_steps` may be None with custom `timesteps` or
            `sigmas`).
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
        if not height or not width:
            sample_size = self.unet.config.sample_size
            height, width = (sample_size, sample_size) if self._is_unet_config_sample_size_int else sample_size
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

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
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 3. Timesteps, initial latents and every step's noise, drawn in the sequential loop's order
        scheduler = self.pcr_timesteps(num_inference_steps, timesteps, sigmas)
        latents = self.prepare_latents(
            batch_size, self.unet.config.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
        )
        step_kwargs, noise, timestep_cond = self.unet_step_inputs(scheduler, latents, generator, eta, batch_size)

        # 4. Denoise: one UNet call per round covers window x 2 x batch; then the callbacks, step by step
        conditioning = {"encoder_hidden_states": prompt_embeds, "timestep_cond": timestep_cond}
        step_end = self.step_end_callback(
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
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
            step_end=step_end,
        )

        # 5. Decode, check safety and post-process, as the parent does
        image, has_nsfw_concept = latents, None
        if output_type != "latent":
            latents = latents / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not x for x in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        output = StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
        return self.pcr_output(output, stats, return_dict)
