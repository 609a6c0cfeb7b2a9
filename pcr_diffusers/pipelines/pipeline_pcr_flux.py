"""PCRFluxPipeline: `FluxPipeline` (flow matching, `FluxTransformer2DModel`, packed latents) sampled in parallel over
time.

A diffusers community pipeline: use it as `PCRFluxPipeline.from_pipe(flux_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_flux.py")`.
"""

from diffusers import FluxPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


class PCRFluxPipeline(PCRParentLoopMixin, FluxPipeline):
    """Text-to-image like `FluxPipeline`, with the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance. What a step's transformer call
    reads besides the packed latents `(B, seq, C)`:

    - per row: the T5 and pooled CLIP embeddings, and the guidance embedding's scale of guidance-distilled models,
      repeated for every step of a round;
    - shared by every row: the position ids `img_ids` and `txt_ids` `(seq, 3)`, which have no batch axis;
    - true classifier-free guidance (`true_cfg_scale > 1` with a negative prompt), for which the parent calls the
      transformer twice per step, runs inside the round's one batched call (negative rows first); both prompts' T5
      sequences must then have the same length (they do unless embeddings of another length are passed).

    With `stochastic_sampling` the parent's scheduler draws its noise from the global RNG, and so do we. The
    transformer's step caches are refused.
    """

    denoisers = ("transformer",)

    def check_call(self, arguments):
        super().check_call(arguments)
        negative = arguments["negative_prompt"] is not None or (
            arguments["negative_prompt_embeds"] is not None and arguments["negative_pooled_prompt_embeds"] is not None
        )
        embeds = (arguments["prompt_embeds"], arguments["negative_prompt_embeds"])
        # two passed embeddings of other shapes are the parent's error; encoded prompts are padded to
        # `max_sequence_length`
        if arguments["true_cfg_scale"] > 1 and negative and None in embeds:
            lengths = [arguments["max_sequence_length"] if e is None else e.shape[1] for e in embeds]
            if lengths[0] != lengths[1]:
                raise ValueError(
                    f"{type(self).__name__} evaluates the prompt and the negative prompt of true classifier-free "
                    f"guidance in one batched call, so their T5 sequences must have the same length; got "
                    f"{lengths[0]} and {lengths[1]} tokens (prompts are padded to `max_sequence_length`)."
                )

    def chain_model(self, calls, latents, arguments):
        scale = arguments["true_cfg_scale"] if len(calls) == 2 else None
        return self.prompt_pair_model(calls, self.flux_model, latents, scale, shared=("txt_ids", "img_ids"))

    def flux_model(self, x, t, **conditioning):
        """One transformer call as the parent's loop makes it: the timestep in the latents' dtype, over 1000."""
        return self.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, return_dict=False, **conditioning)[0]
