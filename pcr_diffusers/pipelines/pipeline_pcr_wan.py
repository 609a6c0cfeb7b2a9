"""PCRWanPipeline: `WanPipeline` (Wan 2.1 text-to-video, flow matching, `WanTransformer3DModel`) sampled in parallel
over time.

A diffusers community pipeline: use it as `PCRWanPipeline.from_pipe(wan_pipe)`, or with
`DiffusionPipeline.from_pretrained(local_dir, custom_pipeline="path/to/pipeline_pcr_wan.py")`.
"""

import torch
from diffusers import WanPipeline

from pcr_diffusers.parent_loop import PCRParentLoopMixin


class PCRWanPipeline(PCRParentLoopMixin, WanPipeline):
    """Text-to-video like `WanPipeline` (Wan 2.1, and Wan 2.2's single-transformer `expand_timesteps` models), with
    the denoising loop solved in parallel.

    The parent's `__call__` runs as written, with its loop answered by the parallel solve (`PCRParentLoopMixin`);
    for the same `generator` the result equals the parent's up to the tolerance, with Wan's default
    `UniPCMultistepScheduler` (flow sigmas) or `FlowMatchEulerDiscreteScheduler`. The parent calls the transformer
    twice per step (prompt, then negative prompt); here one call per round covers window x 2 x batch rows, negative
    first, on latents `(B, C, F, H, W)`. The parent's latents are float32 while the transformer runs in its own
    dtype; the solver's states are float32, or float64 for a float64 transformer. Not supported (clear errors):
    two-stage Wan 2.2 denoising (`boundary_ratio`, `transformer_2`), the transformer's step caches.
    """

    denoisers = ("transformer",)

    def check_call(self, arguments):
        super().check_call(arguments)
        if self.config.get("boundary_ratio") is not None or self.transformer is None:
            raise ValueError(
                f"{type(self).__name__} samples with one `transformer` (Wan 2.1, Wan 2.2 TI2V); two-stage Wan 2.2 "
                f"denoising with `transformer_2` below `boundary_ratio`={self.config.get('boundary_ratio')!r} is not "
                f"implemented. Use WanPipeline."
            )

    def chain_dtype(self, latents):
        return torch.promote_types(latents.dtype, self.transformer.dtype)

    def chain_model(self, calls, latents, arguments):
        scale = self.guidance_scale if len(calls) == 2 else None
        return self.prompt_pair_model(calls, self.wan_model, latents, scale)

    def wan_model(self, x, t, **conditioning):
        """One transformer call as the parent's loop makes it: `x` `(rows, C, F, H, W)`, `t` `(rows,)`; with
        `expand_timesteps` (Wan 2.2 TI2V) one timestep per latent patch, `(rows, F * H/2 * W/2)`, as the parent's
        all-ones mask times `t`."""
        timestep = t
        if self.config.get("expand_timesteps", False):
            frames, height, width = x.shape[2:]
            patches = torch.ones(frames * ((height + 1) // 2) * ((width + 1) // 2), device=t.device)  # float32
            timestep = patches * t.unsqueeze(1)
        hidden_states = x.to(self.transformer.dtype)
        return self.transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False, **conditioning)[0]
