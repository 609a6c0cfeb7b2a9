"""PCRWanPipeline: `WanPipeline` (Wan 2.1 text-to-video, flow matching, `WanTransformer3DModel`) sampled in parallel
over time.

A diffusers community pipeline: use it as `PCRWanPipeline.from_pipe(wan_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_wan.py")`.
"""

from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan import logger
from diffusers.utils.torch_utils import get_module_execution_device

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, PCRTextToImageMixin


class PCRWanPipeline(PCRTextToImageMixin, WanPipeline):
    """Text-to-video like `WanPipeline` (Wan 2.1, and Wan 2.2's single-transformer `expand_timesteps` models), with
    the denoising loop solved in parallel.

    Prompt encoding, latents `(B, C, F, H, W)` and decoding are the parent's; for the same `generator` the result
    equals the parent's up to the tolerance, with Wan's default `UniPCMultistepScheduler` (flow sigmas) or
    `FlowMatchEulerDiscreteScheduler`. The parent calls the transformer twice per step (prompt, then negative
    prompt); here one call per round covers window x 2 x batch rows, negative first. The parent's latents are
    float32 while the transformer runs in its own dtype; the solver's states are float32, or float64 for a float64
    transformer. Not supported (clear errors): two-stage Wan 2.2 denoising (`boundary_ratio`, `transformer_2`), the
    transformer's step caches (`enable_cache`: they reuse the previous step's activations).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        negative_prompt: str | list[str] = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's default)
        max_sequence_length: int = 512,
        *,
        parallel: int | str = DEFAULT_PARALLEL,
        tolerance: float = DEFAULT_TOLERANCE,
        jacobian: str = "auto",
        max_rounds: int | None = None,
        max_memory: int | str | None = None,
    ) -> WanPipelineOutput | tuple:
        r"""Generates videos from text.

        Args:
            prompt ... max_sequence_length: as in `WanPipeline` (`output_type` one of `"np"`, `"pt"`, `"pil"`,
                `"latent"`); `guidance_scale_2` only with `boundary_ratio`, which is not supported.
            parallel, tolerance, jacobian, max_rounds, max_memory: the window solver's, as in `PCRDDPMPipeline`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the parent, but called after the solve,
                in step order, with each step's accepted latents: a callback can only observe (`StepEndCallback`;
                one that would steer the parent's later steps is an error).

        Returns:
            `WanPipelineOutput` with the statistics as its attribute `.stats`, or the parent's tuple `(frames,)`;
            `pipeline.stats` holds them too, per thread.
        """
        # 1. Check inputs, before any model call; the call runs on its own copy of the pipeline and scheduler
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        num_inference_steps = self.check_text_to_image_inputs(num_inference_steps, False)
        self.check_single_transformer()
        self = self.for_text_to_image_call()  # noqa: PLW0642 (the parent keeps per-call state on the pipeline)
        callback_on_step_end_tensor_inputs = self.step_end_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self.check_inputs(
            prompt,
            negative_prompt,
            height,
            width,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            guidance_scale_2,
        )
        # Copied from diffusers.pipelines.wan.pipeline_wan.WanPipeline.__call__ (frames and size rounding)
        if num_frames % self.vae_scale_factor_temporal != 1:
            logger.warning(
                f"`num_frames - 1` has to be divisible by {self.vae_scale_factor_temporal}. Rounding to the nearest "
                f"number."
            )
            num_frames = num_frames // self.vae_scale_factor_temporal * self.vae_scale_factor_temporal + 1
        num_frames = max(num_frames, 1)
        patch_size = self.transformer.config.patch_size
        h_multiple_of = self.vae_scale_factor_spatial * patch_size[1]
        w_multiple_of = self.vae_scale_factor_spatial * patch_size[2]
        calc_height = height // h_multiple_of * h_multiple_of
        calc_width = width // w_multiple_of * w_multiple_of
        if height != calc_height or width != calc_width:
            logger.warning(
                f"`height` and `width` must be multiples of ({h_multiple_of}, {w_multiple_of}) for proper "
                f"patchification. Adjusting ({height}, {width}) -> ({calc_height}, {calc_width})."
            )
            height, width = calc_height, calc_width
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_videos_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompt: negative embeddings first, as `GuidedModel` batches them
        with TEXT_ENCODING_LOCK:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt=prompt,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                num_videos_per_prompt=num_videos_per_prompt,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                max_sequence_length=max_sequence_length,
                device=device,
            )
        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)
        step_end = self.step_end_callback(  # the parent's embeddings, before we batch them
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 3. Timesteps, initial latents `(B, C, F, H, W)` (float32, as the parent draws them) and every step's noise
        scheduler = self.pcr_timesteps(num_inference_steps)
        latents = self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            height,
            width,
            num_frames,
            torch.float32,
            device,
            generator,
            latents,
        )
        # the parent's scheduler step gets no generator: its stochastic steps draw from the global RNG
        noise = scheduler.draw_noise(latents.shape, None, latents.device, latents.dtype)
        # The states: the wider of float32 and the transformer's dtype. The parent's flow-matching step returns the
        # model output's dtype (float64 from the first step on, for a float64 transformer), its UniPC step keeps
        # float32; a half-precision transformer's inputs are cast in `_transformer_model`, as the parent casts them.
        latents = latents.to(torch.promote_types(latents.dtype, transformer_dtype))

        # 4. Denoise: one transformer call per round covers window x 2 x batch; then the callbacks, step by step
        conditioning = {"encoder_hidden_states": prompt_embeds}
        latents, stats = self.guided_denoise(
            self._transformer_model, conditioning, scheduler, latents, noise, options, step_end=step_end
        )

        # 5. Decode and post-process, as the parent does
        video = latents
        if output_type != "latent":
            # Copied from diffusers.pipelines.wan.pipeline_wan.WanPipeline.__call__ (decoding)
            latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
            z_dim = self.vae.config.z_dim
            latents_mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
            latents_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1)
            latents_mean, latents_std = latents_mean.to(latents.device, latents.dtype), latents_std.to(latents)
            latents = latents / latents_std + latents_mean
            video = self.vae.decode(latents, return_dict=False)[0]
            video = self.video_processor.postprocess_video(video, output_type=output_type)
        return self.pcr_output(WanPipelineOutput(frames=video), stats, return_dict)

    def check_single_transformer(self) -> None:
        """A clear error, before any model call, for what the batched call does not reproduce: two-stage denoising
        (the parent switches to `transformer_2` and `guidance_scale_2` below `boundary_ratio`), no `transformer`,
        and a step cache on the transformer (it would reuse activations of steps evaluated out of order)."""
        if self.config.get("boundary_ratio") is not None or self.transformer is None:
            raise ValueError(
                f"{type(self).__name__} samples with one `transformer` (Wan 2.1, Wan 2.2 TI2V); two-stage Wan 2.2 "
                f"denoising with `transformer_2` below `boundary_ratio`={self.config.get('boundary_ratio')!r} is not "
                f"implemented. Use WanPipeline."
            )
        if getattr(self.transformer, "is_cache_enabled", False):
            raise ValueError(
                f"{type(self).__name__} does not support the transformer's step cache: it reuses the previous step's "
                f"activations, and parallel sampling evaluates the steps out of order. Call "
                f"`pipe.transformer.disable_cache()`, or use WanPipeline."
            )

    def _transformer_model(self, x, t, encoder_hidden_states):
        """One transformer call as the sequential loop makes it: `x` `(rows, C, F, H, W)`, `t` `(rows,)`; with
        `expand_timesteps` (Wan 2.2 TI2V) one timestep per latent patch, `(rows, F * H/2 * W/2)`, as the parent's
        all-ones mask times `t`."""
        timestep = t
        if self.config.get("expand_timesteps", False):
            frames, height, width = x.shape[2:]
            patches = torch.ones(frames * ((height + 1) // 2) * ((width + 1) // 2), device=t.device)  # float32
            timestep = patches * t.unsqueeze(1)
        return self.transformer(
            hidden_states=x.to(self.transformer.dtype),
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0]
