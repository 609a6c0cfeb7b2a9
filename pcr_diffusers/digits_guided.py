"""The shipped guided model: a class-conditional `DiTTransformer2DModel` on scikit-learn's 8x8 digits, with a tiny
`AutoencoderKL` trained alongside, sampled with classifier-free guidance by diffusers' own `DiTPipeline`.

`load_guided_digits_pipeline()` returns a plain `DiTPipeline` built from the weights inside this package (no hub):
`pipe(class_labels=[3, 7], guidance_scale=4.0)` draws a three and a seven. `train_guided_digits()` is how those
weights were made; `guided_digit_quality()` checks that the samples are the digits asked for, with the classifier of
`pcr_diffusers.digits.digit_quality`.

The VAE does not downsample: an image `(1, 8, 8)` in [-1, 1] is a latent `(4, 8, 8)`, which the DiT cuts into 2x2
patches (16 tokens).
"""

import copy
import logging
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from tqdm.auto import tqdm

from .digits import digit_quality, load_digits_data

logger = logging.getLogger(__name__)

GUIDED_DIGITS_DIR = Path(__file__).parent / "data" / "digits-dit"
GUIDED_SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
# `DiTPipeline` hard-codes the unconditional label as 1000, and diffusers' `LabelEmbedding` keeps its null (CFG) row
# at index `num_embeds_ada_norm`: the two agree only when `num_embeds_ada_norm` is 1000, so the label tables have
# rows for 1000 classes (10 of them used) and the null one.
NULL_LABEL = 1000
# `DiTPipeline(id2label=...)` reads comma-separated names: `pipe.get_label_ids(["three", "7"])` is `[3, 7]`.
DIGIT_NAMES = {
    digit: f"{name}, {digit}"
    for digit, name in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
}
MIN_TRAIN_STEPS = 10  # a tenth of the run warms the learning rate up: at least one step


def load_guided_digits_pipeline(scheduler: str = "ddim", path: str | Path = GUIDED_DIGITS_DIR) -> DiTPipeline:
    """The shipped guided digits model as a plain diffusers `DiTPipeline`, with a DDIM (`"ddim"`, as saved) or DDPM
    (`"ddpm"`, its config taken from the DDIM one) scheduler, and the digits' names as labels."""
    if scheduler not in GUIDED_SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {tuple(GUIDED_SCHEDULERS)}, got {scheduler!r}.")
    if not (Path(path) / "model_index.json").exists():
        raise FileNotFoundError(
            f"No trained guided digits pipeline at {path}; train one with `pcr-diffusers train-guided-digits`."
        )
    pipe = DiTPipeline.from_pretrained(path, id2label=DIGIT_NAMES)
    if scheduler != "ddim":
        pipe.scheduler = GUIDED_SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe


def guided_digit_quality(
    pipe: DiTPipeline,
    per_digit: int = 10,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> dict:
    """`digit_quality` of `per_digit` samples of each digit 0-9 drawn by `pipe` with `guidance_scale`, including
    `label_accuracy`: the fraction that the classifier reads as the digit asked for."""
    labels = torch.arange(10).repeat_interleave(per_digit)  # (10 * per_digit,)
    images = pipe(
        class_labels=labels.tolist(),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images  # (10 * per_digit, 1, 8, 8) in [0, 1]
    return digit_quality(images * 2 - 1, labels)


def digits_vae() -> AutoencoderKL:
    """About 140k parameters: one level (no downsampling), `(1, 8, 8)` images to `(4, 8, 8)` latents."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(32,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )


def digits_dit() -> DiTTransformer2DModel:
    """About 650k parameters: width 64 (4 heads), 4 blocks, 2x2 patches of the `(4, 8, 8)` latents, epsilon output
    only (no learned variance). A quarter of the parameters are the unused rows 10-999 of the label tables.

    Initialised as the DiT paper's adaLN-Zero: the modulation and output layers start at zero, so every block starts
    as the identity and the model as the constant prediction zero.
    """
    transformer = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NULL_LABEL,
    )
    modulations = [block.norm1.linear for block in transformer.transformer_blocks]
    for layer in (*modulations, transformer.proj_out_1, transformer.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return transformer


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over a tenth of the run (at most 200 steps), then cosine decay to zero; as `train_digits`."""
    warmup = min(200, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0)))
    )


def _check_steps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_TRAIN_STEPS:
        raise ValueError(
            f"`{name}` must be an int of at least {MIN_TRAIN_STEPS} (the warm-up is a tenth of the run), got "
            f"{value!r}."
        )


def _train_vae(
    vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float
) -> None:
    """Fits `vae` to `images`, `(N, 1, 8, 8)`: mean squared reconstruction error of a posterior sample plus
    `kl_weight` times the KL divergence to N(0, I) per latent element, which keeps the latents smooth enough to
    diffuse. Then sets `scaling_factor` to one over the standard deviation of the posterior samples, as diffusers'
    VAEs are scaled."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, steps)
    latent_size = vae.config.latent_channels * images.shape[-2] * images.shape[-1]
    progress = tqdm(range(steps), desc="train digits VAE")
    for i in progress:
        x = images[torch.randint(len(images), (batch_size,))]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + kl_weight * posterior.kl().mean() / latent_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if i % 50 == 0:
            progress.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = vae.encode(images).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=1 / std)


def train_guided_digits(
    out_dir: str | Path = GUIDED_DIGITS_DIR,
    steps: int = 4000,
    vae_steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    kl_weight: float = 1e-3,
    seed: int = 0,
    transformer: DiTTransformer2DModel | None = None,
    vae: AutoencoderKL | None = None,
) -> DiTPipeline:
    """Trains the VAE (`vae_steps`), then the class-conditional DiT on its scaled latents (`steps`; epsilon
    prediction, 1000 linear-beta steps) and saves both as a `DiTPipeline` with a DDIM scheduler.

    A `label_dropout` fraction of each batch is trained with the null label 1000 instead of its digit, so that one
    model gives both halves of classifier-free guidance. AdamW with warm-up and cosine decay for both models; the
    saved DiT is an exponential moving average of the trained one. `transformer` and `vae` (untrained; by default
    `digits_dit()` and `digits_vae()`) let a test train tiny ones.
    """
    _check_steps("steps", steps)
    _check_steps("vae_steps", vae_steps)
    if not 0 <= label_dropout < 1:
        raise ValueError(f"`label_dropout` must be in [0, 1), got {label_dropout!r}.")
    torch.manual_seed(seed)
    transformer = digits_dit() if transformer is None else transformer
    vae = digits_vae() if vae is None else vae
    if transformer.config.num_embeds_ada_norm != NULL_LABEL:
        raise ValueError(
            f"`transformer` must have num_embeds_ada_norm={NULL_LABEL} (DiTPipeline's null label), got "
            f"{transformer.config.num_embeds_ada_norm}."
        )
    if (transformer.config.in_channels, transformer.config.sample_size) != (vae.config.latent_channels, 8):
        raise ValueError(
            f"`transformer` must take the VAE's latents, ({vae.config.latent_channels}, 8, 8) (the VAE does not "
            f"downsample), got in_channels={transformer.config.in_channels}, "
            f"sample_size={transformer.config.sample_size}."
        )
    if transformer.config.out_channels != transformer.config.in_channels:
        # DiTPipeline reads `out_channels` from the config (None fails there), and a learned variance is not trained
        raise ValueError(
            f"`transformer` must predict epsilon only, out_channels={transformer.config.in_channels} (its "
            f"in_channels), got out_channels={transformer.config.out_channels}."
        )
    if (vae.config.in_channels, vae.config.out_channels, len(vae.config.block_out_channels)) != (1, 1, 1):
        raise ValueError(
            f"`vae` must take (1, 8, 8) images at one level (no downsampling), got in_channels="
            f"{vae.config.in_channels}, out_channels={vae.config.out_channels}, block_out_channels="
            f"{vae.config.block_out_channels}."
        )
    images, labels = load_digits_data()
    _train_vae(vae, images, vae_steps, batch_size, lr, kl_weight)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        mean, std = posterior.mean, posterior.std  # (N, C, 8, 8)

    # The DiT stays in eval mode: in train mode each block's label embedder would drop labels on its own draw (with
    # its fixed probability 0.1), where guidance needs a whole sample's label dropped in every block at once. The
    # model has no dropout or batch norm, so eval mode changes nothing else.
    transformer.eval()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, steps)
    progress = tqdm(range(steps), desc="train guided digits")
    for i in progress:
        index = torch.randint(len(images), (batch_size,))
        z0 = (mean[index] + std[index] * torch.randn_like(mean[index])) * vae.config.scaling_factor
        y = torch.where(torch.rand(batch_size) < label_dropout, NULL_LABEL, labels[index])
        noise = torch.randn_like(z0)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,))
        prediction = transformer(scheduler.add_noise(z0, noise, t), timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + i) / (10 + i))
            for p_ema, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if i % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    pipe = DiTPipeline(
        transformer=ema, vae=vae, scheduler=DDIMScheduler.from_config(scheduler.config), id2label=DIGIT_NAMES
    )
    pipe.save_pretrained(out_dir)
    logger.info("saved the guided digits pipeline to %s", out_dir)
    return pipe
