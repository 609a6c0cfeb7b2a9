"""PCRFluxPipeline: `FluxPipeline` (flow matching, `FluxTransformer2DModel`, packed latents) sampled in parallel over
time.

A diffusers community pipeline: use it as `PCRFluxPipeline.from_pipe(flux_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_flux.py")`.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import get_module_execution_device

from pcr_diffusers.sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, ParallelOptions
from pcr_diffusers.text_to_image import TEXT_ENCODING_LOCK, GuidedModel, PCRTextToImageMixin


class PCRFluxPipeline(PCRTextToImageMixin, FluxPipeline):
    """Text-to-image like `FluxPipeline`, with the denoising loop solved in parallel.

    Prompt encoding (CLIP's pooled output and T5), the packed latents `(B, seq, C)` (2x2 patches of the VAE's
    latents) with their position ids, the flow-matching schedule (the parent's sigmas, shifted by the `mu` of the
    image's sequence length) and decoding are the parent's; for the same `generator` the result equals the parent's
    up to the tolerance. What a step's transformer call reads besides the latents:

    - per row: the T5 and pooled CLIP embeddings, and the guidance embedding's scale of guidance-distilled models
      (`guidance_scale`, with `guidance_embeds`), repeated for every step of a round;
    - shared by every row: the position ids `img_ids` and `txt_ids` `(seq, 3)`, which have no batch axis;
    - true classifier-free guidance (`true_cfg_scale > 1` with a negative prompt), for which the parent calls the
      transformer twice per step, runs inside the round's one batched call (negative rows first) and is combined as
      the parent combines it, `neg + true_cfg_scale * (pos - neg)`; both prompts' T5 sequences must then have the
      same length (they do unless embeddings of another length are passed).

    With `stochastic_sampling` the parent's scheduler draws its noise from the global RNG, and so do we.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (the parent's default)
        max_sequence_length: int = 512,
        *,
        parallel: int | str = DEFAULT_PARALLEL,
        tolerance: float = DEFAULT_TOLERANCE,
        jacobian: str = "auto",
        max_rounds: int | None = None,
        max_memory: int | str | None = None,
    ) -> FluxPipelineOutput | tuple:
        r"""Generates images from text.

        Args:
            prompt ... max_sequence_length: as in `FluxPipeline` (`output_type` one of `"pil"`, `"np"`, `"pt"`,
                `"latent"`; `"latent"` returns the packed latents `(B, seq, C)`, as the parent does).
            parallel, tolerance, jacobian, max_rounds, max_memory: the window solver's, as in `PCRDDPMPipeline`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: as in the parent (which, unlike the others,
                does not take a `PipelineCallback`'s `tensor_inputs`), but called after the solve, in step order,
                with each step's accepted latents: a callback can only observe (`StepEndCallback`; one that would
                steer the parent's later steps is an error).
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds:
                not supported (a clear error).

        Returns:
            `FluxPipelineOutput` with the statistics as its attribute `.stats`, or the parent's tuple `(images,)`;
            `pipeline.stats` holds them too, per thread.
        """
        # 1. Check inputs, before any model call; the call runs on its own copy of the pipeline and scheduler
        options = ParallelOptions(parallel, tolerance, jacobian, max_rounds, max_memory)
        num_inference_steps = self.check_text_to_image_inputs(
            num_inference_steps,
            sigmas is not None,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            negative_ip_adapter_image=negative_ip_adapter_image,
            negative_ip_adapter_image_embeds=negative_ip_adapter_image_embeds,
        )
        if getattr(self.transformer, "is_cache_enabled", False):  # as PCRWanPipeline: a MagCache ran silently, off
            raise ValueError(
                f"{type(self).__name__} does not support the transformer's step cache: it reuses the previous step's "
                f"activations, and parallel sampling evaluates the steps out of order. Call "
                f"`pipe.transformer.disable_cache()`, or use FluxPipeline."
            )
        self = self.for_text_to_image_call()  # noqa: PLW0642 (the parent keeps per-call state on the pipeline)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        batch_size = self.effective_batch_size(prompt, prompt_embeds, num_images_per_prompt, generator)
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = {} if joint_attention_kwargs is None else joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        if do_true_cfg:
            self._check_true_cfg_embeds(prompt_embeds, negative_prompt_embeds, max_sequence_length)

        # 2. Encode the prompts; the negative ones are batched first, as GuidedModel calls the model
        encode = dict(
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=self.joint_attention_kwargs.get("scale"),
        )
        with TEXT_ENCODING_LOCK:
            prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
                prompt, prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, **encode
            )
            if do_true_cfg:
                # the negative text ids are the positive ones: zeros `(seq, 3)` for sequences of the same length
                negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                    negative_prompt,
                    negative_prompt_2,
                    prompt_embeds=negative_prompt_embeds,
                    pooled_prompt_embeds=negative_pooled_prompt_embeds,
                    **encode,
                )
        if do_true_cfg and len(negative_prompt_embeds) != len(prompt_embeds):
            if len(negative_prompt_embeds) != 1:
                raise ValueError(
                    f"True classifier-free guidance needs one negative prompt, or one per prompt: got "
                    f"{len(negative_prompt_embeds)} negative and {len(prompt_embeds)} positive rows."
                )
            # the parent's negative call broadcasts a single negative prompt over the batch
            negative_prompt_embeds = negative_prompt_embeds.expand(len(prompt_embeds), -1, -1)
            negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.expand(len(prompt_embeds), -1)

        # 3. Initial (packed) latents and their position ids, the shifted timesteps, and the noise of stochastic steps
        latents, latent_image_ids = self.prepare_latents(
            batch_size,
            self.transformer.config.in_channels // 4,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        scheduler = self.pcr_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        # the parent's scheduler step gets no generator: its stochastic steps draw from the global RNG
        noise = scheduler.draw_noise(latents.shape, None, latents.device, latents.dtype)

        # 4. Denoise: one transformer call per round covers window x (2 with true CFG) x batch; then the callbacks
        step_end = self.step_end_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, prompt_embeds=prompt_embeds
        )  # the parent's `prompt_embeds` are the prompt's alone
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0] * (2 if do_true_cfg else 1))
        if do_true_cfg:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds])
        conditioning = {
            "encoder_hidden_states": prompt_embeds,
            "pooled_projections": pooled_prompt_embeds,
            "guidance": guidance,
            "txt_ids": text_ids,
            "img_ids": latent_image_ids,
        }
        model = GuidedModel(
            self._transformer_model,
            conditioning,
            latents.shape[0],
            true_cfg_scale if do_true_cfg else None,
            shared=("txt_ids", "img_ids"),
        )
        latents, stats = self.pcr_denoise(model, scheduler, latents, noise, options, step_end=step_end)

        # 5. Decode and post-process, as the parent does
        image = latents
        if output_type != "latent":
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        return self.pcr_output(FluxPipelineOutput(images=image), stats, return_dict)

    @staticmethod
    def _check_true_cfg_embeds(prompt_embeds, negative_prompt_embeds, max_sequence_length: int) -> None:
        """The parent's check of passed embeddings under true CFG, and ours: the positive and negative T5 sequences
        have the same length (encoded prompts are padded to `max_sequence_length`), so one call batches them."""
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )
        lengths = [max_sequence_length if e is None else e.shape[1] for e in (prompt_embeds, negative_prompt_embeds)]
        if lengths[0] != lengths[1]:
            raise ValueError(
                f"PCRFluxPipeline evaluates the prompt and the negative prompt of true classifier-free guidance in "
                f"one batched call, so their T5 sequences must have the same length; got {lengths[0]} and "
                f"{lengths[1]} tokens (prompts are padded to `max_sequence_length`={max_sequence_length})."
            )

    def _transformer_model(self, x, t, **conditioning):
        """One transformer call as the sequential loop makes it: the timestep in the latents' dtype, over 1000."""
        return self.transformer(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
            **conditioning,
        )[0]
