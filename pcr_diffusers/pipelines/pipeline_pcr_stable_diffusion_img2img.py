"""PCRStableDiffusionImg2ImgPipeline: `StableDiffusionImg2ImgPipeline` (SD 1.x / 2.x) sampled in parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusionImg2ImgPipeline.from_pipe(sd_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_img2img.py")`.
"""

from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import PCRTextToImageMixin


class PCRStableDiffusionImg2ImgPipeline(PCRTextToImageMixin, StableDiffusionImg2ImgPipeline):
    """Image-to-image like `StableDiffusionImg2ImgPipeline`, with the denoising loop solved in parallel.

    `strength` keeps the last `int(num_inference_steps * strength)` steps of the schedule: the chain starts
    mid-schedule (`DenoisingChain(steps=range(begin, N))`), from the image's latents noised to its first timestep.
    Prompt and image encoding, the noised latents and decoding are the parent's; for the same `generator` the result
    equals the parent's up to the tolerance, with classifier-free guidance inside the batched UNet call.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        image: PipelineImageInput = None,
        strength: float = 0.8,
        num_inference_steps: int | None = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float | None = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float | None = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        r"""Generates images from an image and text.

        Args:
            prompt, image, strength, num_inference_steps, timesteps, sigmas, guidance_scale, negative_prompt,
            num_images_per_prompt, eta, generator, prompt_embeds, negative_prompt_embeds, output_type (`"pil"`,
            `"np"`, `"pt"` or `"latent"`), return_dict, cross_attention_kwargs, clip_skip: as in
            `StableDiffusionImg2ImgPipeline` (`num_inference_steps` may be None with custom `timesteps` or
            `sigmas`). A `strength` that keeps no step is an error.
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
        self.check_inputs(
            prompt,
            strength,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Timesteps: the last steps of the schedule, as `strength` keeps them (no model call yet)
        scheduler, steps = self.pcr_image_to_image_timesteps(num_inference_steps, strength, timesteps, sigmas)

        # 3. Encode the prompt: negative embeddings first, as the sequential loop batches them
        prompt_embeds, negative_prompt_embeds = self.sd_prompt_embeds(
            prompt, negative_prompt, num_images_per_prompt, prompt_embeds, negative_prompt_embeds
        )

        # 4. The image's latents noised to the first kept timestep, then every step's noise, in the loop's order
        latent_timestep = scheduler.timesteps[steps.start : steps.start + 1].repeat(batch_size)
        image = self.image_processor.preprocess(image)
        # `batch_size` counts the images per prompt already
        latents = self.prepare_latents(image, latent_timestep, batch_size, 1, prompt_embeds.dtype, device, generator)
        step_kwargs, noise, timestep_cond = self.unet_step_inputs(
            scheduler, latents, generator, eta, batch_size, steps
        )

        # 5. Denoise: one UNet call per round covers window x 2 x batch; then the callbacks, step by step
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
            step_kwargs=step_kwargs,
            steps=steps,
            step_end=step_end,
        )

        # 6. Decode, check safety and post-process, as the parent does
        image, has_nsfw_concept = self.decode_with_safety_checker(latents, output_type, generator)
        output = StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)
        return self.pcr_output(output, stats, return_dict)
