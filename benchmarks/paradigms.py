"""ParaDiGMS (Shih et al., 2023) run the way diffusers' `StableDiffusionParadigmsPipeline` runs it, for an
unconditional UNet: the peer we compare against, driven by diffusers' own `DDPMParallelScheduler` /
`DDIMParallelScheduler` (`batch_step_no_noise`).

Picard iteration over a sliding window: every state in the window becomes the window's first state plus the
cumulative sum of the drifts `step(x_j) - x_j` and of the step noises; the window slides past the states whose
squared change, divided by the next step's noise variance and the latent size, is within `tolerance**2`.
"""

import torch
from diffusers.utils.torch_utils import randn_tensor


@torch.no_grad()
def paradigms_sample(unet, scheduler, latents, generator=None, parallel: int = 10, tolerance: float = 0.1):
    """Returns the final latents `(B, C, H, W)`, the rounds (batched model calls) and the step evaluations.

    `scheduler` is a `DDPMParallelScheduler` or `DDIMParallelScheduler` after `set_timesteps`; the defaults
    `parallel=10, tolerance=0.1` are `StableDiffusionParadigmsPipeline`'s. Noise is drawn after the initial latents,
    one draw per step, as that pipeline does.
    """
    timesteps = scheduler.timesteps
    num_steps = len(timesteps)
    parallel = min(parallel, num_steps)
    variances = torch.stack([torch.as_tensor(scheduler._get_variance(t)) for t in timesteps]).to(latents)
    draws = [
        randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        for _ in range(num_steps)
    ]
    noise = variances.sqrt().reshape(-1, *([1] * latents.ndim)) * torch.stack(draws)  # (N, B, C, H, W)
    # 1 / (variance of the noise that the next step adds * latent size); the last state has none (weight inf)
    inverse_variance = 1 / torch.cat([variances, variances.new_zeros(1)]) / latents[0].numel()

    states = latents.expand(num_steps + 1, *latents.shape).clone()  # states[j] is x before step j
    begin, end, rounds, evaluations = 0, parallel, 0, 0
    while begin < num_steps:
        n, batch = end - begin, latents.shape[0]
        block = states[begin:end]  # (n, B, C, H, W)
        t = timesteps[begin:end, None].expand(n, batch).to(latents.device)
        model_output = unet(block.flatten(0, 1), t.flatten()).sample
        stepped = scheduler.batch_step_no_noise(model_output, t.flatten(), block.flatten(0, 1)).reshape(block.shape)
        new = states[begin][None] + torch.cumsum(stepped - block, 0)
        if not scheduler._is_ode_scheduler:
            new = new + torch.cumsum(noise[begin:end], 0)
        change = (new - states[begin + 1 : end + 1]).flatten(2).norm(dim=-1).pow(2)  # (n, B)
        too_big = (change * inverse_variance[begin + 1 : end + 1, None] > tolerance**2).any(dim=1)
        first_bad = int(too_big.int().argmax()) if bool(too_big.any()) else n
        states[begin + 1 : end + 1] = new
        new_begin = begin + min(first_bad + 1, parallel)
        new_end = min(new_begin + parallel, num_steps)
        states[end : new_end + 1] = states[end]
        rounds, evaluations = rounds + 1, evaluations + n
        begin, end = new_begin, new_end
    return states[-1], rounds, evaluations
