"""PCRStableDiffusion3Pipeline: `StableDiffusion3Pipeline` (flow matching, `SD3Transformer2DModel`) sampled in
parallel over time.

A diffusers community pipeline: use it as `PCRStableDiffusion3Pipeline.from_pipe(sd3_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_stable_diffusion_3.py")`.
"""

from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


class PCRStableDiffusion3Pipeline(PCRTextToImageMixin, StableDiffusion3Pipeline):
    """Text-to-image like `StableDiffusion3Pipeline`, with the denoising loop solved in parallel.

    Prompt encoding (two CLIP encoders and the optional T5), latents, the (dynamically) shifted flow-matching
    schedule and decoding are the parent's; for the same `generator` the result equals the parent's up to the
    tolerance, with classifier-free guidance inside the batched transformer call. With `stochastic_sampling` the
    parent's scheduler draws its noise from the global RNG (its `step` gets no generator), and so do we.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's default)
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
        *,
        parallel: int | str = DEFAULT_PARALLEL,
        tolerance: float = DEFAULT_TOLERANCE,
        jacobian: str = "auto",
        max_rounds: int | None = None,
        max_memory: int | str | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        r"""Generates images from text.

        Args:
            prompt ... max_sequence_length, mu: as in `StableDiffusion3Pipeline` (`output_type` one of `"pil"`,
                `"np"`, `"pt"`, `"latent"`).
            parallel, tolerance, jacobian, max_rounds, max_memory: the window solver's, as in `PCRDDPMPipeline`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the parent, but called after the solve,
                in step order, with each step's accepted latents: a callback can only observe (`StepEndCallback`;
                one that would steer the parent's later steps is an error).
            ip_adapter_image, ip_adapter_image_embeds, skip_guidance_layers: not supported (a clear error); the
                other skip-layer arguments only apply with `skip_guidance_layers`.

        Returns:
            `StableDiffusion3PipelineOutput` with the statistics as its attribute `.stats`, or the parent's tuple
            `(images,)`; `pipeline.stats` holds them too, per thread.
        """
        # 1. Check inputs, before any model call; the call runs on its own copy of the pipeline and scheduler
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        num_inference_steps = self.check_text_to_image_inputs(
            num_inference_steps,
            sigmas is not None,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            skip_guidance_layers=skip_guidance_layers,
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
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompt: negative embeddings first, as the sequential loop batches them
        with TEXT_ENCODING_LOCK:
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = (
                self.encode_prompt(
                    prompt=prompt,
                    prompt_2=prompt_2,
                    prompt_3=prompt_3,
                    negative_prompt=negative_prompt,
                    negative_prompt_2=negative_prompt_2,
                    negative_prompt_3=negative_prompt_3,
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=pooled_prompt_embeds,
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    device=device,
                    clip_skip=clip_skip,
                    num_images_per_prompt=num_images_per_prompt,
                    max_sequence_length=max_sequence_length,
                    lora_scale=(joint_attention_kwargs or {}).get("scale"),
                )
            )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])

        # 3. Initial latents, the (shifted) timesteps and every step's noise, drawn in the sequential loop's order
        latents = self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        if mu is None and self.scheduler.config.get("use_dynamic_shifting", None):
            patch_size = self.transformer.config.patch_size
            mu = calculate_shift(
                (latents.shape[-2] // patch_size) * (latents.shape[-1] // patch_size),
                self.scheduler.config.get("base_image_seq_len", 256),
                self.scheduler.config.get("max_image_seq_len", 4096),
                self.scheduler.config.get("base_shift", 0.5),
                self.scheduler.config.get("max_shift", 1.16),
            )
        shift = {} if mu is None else {"mu": mu}
        scheduler = self.pcr_timesteps(num_inference_steps, sigmas=sigmas, **shift)
        # the parent's scheduler step gets no generator: its stochastic steps draw from the global RNG
        noise = scheduler.draw_noise(latents.shape, None, latents.device, latents.dtype)

        # 4. Denoise: one transformer call per round covers window x 2 x batch; then the callbacks, step by step
        conditioning = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}
        step_end = self.step_end_callback(
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
        )
        latents, stats = self.guided_denoise(
            self._transformer_model, conditioning, scheduler, latents, noise, options, step_end=step_end
        )

        # 5. Decode and post-process, as the parent does
        image = latents
        if output_type != "latent":
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.image_processor.postprocess(self.vae.decode(latents, return_dict=False)[0], output_type)
        return self.pcr_output(StableDiffusion3PipelineOutput(images=image), stats, return_dict)

    def _transformer_model(self, x, t, **conditioning):
        """One transformer call as the sequential loop makes it."""
        return self.transformer(
            hidden_states=x,
            timestep=t,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
            **conditioning,
        )[0]
