"""The shipped model: a small DDPM `UNet2DModel` trained on scikit-learn's 8x8 handwritten digits.

`load_digits_pipeline()` returns an ordinary diffusers pipeline built from the weights inside this package (no hub).
`train_digits()` is how those weights were made; `digit_quality()` checks samples with a classifier trained on the
real digits.
"""

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DIGITS_DIR = Path(__file__).parent / "data" / "digits-ddpm"
DIGITS_PIPELINES = {"ddpm": (DDPMPipeline, DDPMScheduler), "ddim": (DDIMPipeline, DDIMScheduler)}


def load_digits_pipeline(scheduler: str = "ddpm", path: str | Path = DIGITS_DIR) -> DDPMPipeline | DDIMPipeline:
    """The shipped digits model as a plain diffusers `DDPMPipeline` (`"ddpm"`) or `DDIMPipeline` (`"ddim"`).

    The DDIM pipeline shares the trained UNet and takes its scheduler's config from the DDPM one, so nothing is
    retuned. Our PCR pipelines are swapped in from either with `from_pipe`.
    """
    if scheduler not in DIGITS_PIPELINES:
        raise ValueError(f"`scheduler` must be one of {tuple(DIGITS_PIPELINES)}, got {scheduler!r}.")
    if not (Path(path) / "model_index.json").exists():
        raise FileNotFoundError(f"No trained digits pipeline at {path}; train one with `pcr-diffusers train-digits`.")
    pipe = DDPMPipeline.from_pretrained(path)
    pipeline_class, scheduler_class = DIGITS_PIPELINES[scheduler]
    if pipeline_class is DDPMPipeline:
        return pipe
    return pipeline_class(unet=pipe.unet, scheduler=scheduler_class.from_config(pipe.scheduler.config))


def load_digits_data() -> torch.Tensor:
    """The 1797 digits of scikit-learn as a `(N, 1, 8, 8)` float tensor in [-1, 1], and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("Training and checking the digits model needs scikit-learn: pip install scikit-learn") from (
            error
        )
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    return images, torch.tensor(data.target)


def digits_unet() -> UNet2DModel:
    """About 1.1M parameters, with self-attention at 4x4 on the way down and up."""
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=8,
    )


def train_digits(
    out_dir: str | Path = DIGITS_DIR,
    steps: int = 6000,
    batch_size: int = 128,
    lr: float = 2e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
) -> DDPMPipeline:
    """Trains the digits DDPM (epsilon prediction, 1000 linear-beta steps, clipped samples) and saves it.

    AdamW with warm-up and cosine decay; the saved weights are an exponential moving average of the trained ones.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise ValueError(f"`steps` must be an int of at least 10 (the warm-up is a tenth of the run), got {steps!r}.")
    torch.manual_seed(seed)
    images, _ = load_digits_data()
    unet = digits_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10)
    lr_lambda = lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i / steps, 1.0)))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    progress = tqdm(range(steps), desc="train digits")
    for i in progress:
        x0 = images[torch.randint(len(images), (batch_size,))]
        noise = torch.randn_like(x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + i) / (10 + i))
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if i % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    pipe = DDPMPipeline(unet=ema.eval(), scheduler=scheduler)
    pipe.save_pretrained(out_dir)
    logger.info("saved the digits pipeline to %s", out_dir)
    return pipe


def digit_quality(samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Recognisability of generated digits in [-1, 1], `(N, 1, 8, 8)`, by an SVM trained on the real digits.

    Returns the classifier's accuracy on held-out real digits (its own quality), the mean and median confidence
    (largest class probability) on the samples, the fraction classified with confidence >= 0.9, and the count of
    samples per predicted digit. Given the digits the samples were asked to be, `labels` `(N,)`, also the fraction
    classified as asked (`label_accuracy`).
    """
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, digits = load_digits_data()
    features = ((images + 1) * 8).reshape(len(images), -1).numpy()
    train_x, test_x, train_y, test_y = train_test_split(features, digits.numpy(), test_size=0.25, random_state=0)
    classifier = SVC(gamma=0.001, probability=True, random_state=0).fit(train_x, train_y)
    probs = classifier.predict_proba(((samples.clamp(-1, 1) + 1) * 8).reshape(len(samples), -1).cpu().numpy())
    confidence = probs.max(1)
    quality = {
        "classifier_accuracy": float(classifier.score(test_x, test_y)),
        "mean_confidence": float(confidence.mean()),
        "median_confidence": float(np.median(confidence)),
        "confident_fraction": float((confidence >= 0.9).mean()),
        "digit_counts": np.bincount(probs.argmax(1), minlength=10).tolist(),
    }
    if labels is not None:
        if len(labels) != len(samples):
            raise ValueError(f"`labels` must have one label per sample ({len(samples)}), got {len(labels)}.")
        quality["label_accuracy"] = float((probs.argmax(1) == np.asarray(labels)).mean())
    return quality
