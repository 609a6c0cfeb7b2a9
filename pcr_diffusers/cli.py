"""The `pcr-diffusers` command: generate digits in parallel (or sequentially), compare both, train the model."""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils import make_image_grid
from PIL import ImageOps

from .digits import DIGITS_DIR, digit_quality, train_digits
from .pipelines import PCRDDIMPipeline, PCRDDPMPipeline
from .sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, DIFFUSION_JACOBIANS

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
}


def build_pipeline(model: str | Path, scheduler: str) -> PCRDDPMPipeline | PCRDDIMPipeline:
    """A PCR pipeline for the unconditional pipeline saved in `model`, with its scheduler converted to `scheduler`."""
    base = DDPMPipeline.from_pretrained(model)
    pipeline_class = PCRDDIMPipeline if scheduler == "ddim" else PCRDDPMPipeline
    pipe = pipeline_class(unet=base.unet, scheduler=SCHEDULERS[scheduler].from_config(base.scheduler.config))
    pipe.set_progress_bar_config(leave=False)
    return pipe


def save_grid(images: np.ndarray, path: str | Path, scale: int) -> None:
    """Saves `(N, H, W, C)` images in [0, 1] as one grid PNG, each image enlarged `scale` times (nearest) and framed
    by a gray border of `scale` pixels so neighbouring images stay apart."""
    pils = PCRDDPMPipeline.numpy_to_pil(images)
    pils = [ImageOps.expand(im.resize((im.width * scale, im.height * scale), 0), scale, fill=96) for im in pils]
    cols = int(np.ceil(np.sqrt(len(pils))))
    rows = int(np.ceil(len(pils) / cols))
    pils += [pils[0].point(lambda _: 0)] * (rows * cols - len(pils))  # black cells fill the last row
    make_image_grid(pils, rows=rows, cols=cols).save(path)


def generate(args) -> int:
    pipe = build_pipeline(args.model, args.scheduler)
    steps = args.steps or (1000 if args.scheduler == "ddpm" else 50)
    extra = {"eta": args.eta} if args.scheduler == "ddim" else {}

    window = args.parallel or max(8, DEFAULT_PARALLEL // args.num_images)

    def run(parallel):
        start = time.perf_counter()
        out = pipe(
            batch_size=args.num_images,
            generator=torch.Generator().manual_seed(args.seed),
            num_inference_steps=steps,
            output_type="np",
            parallel=parallel,
            tolerance=args.tolerance,
            jacobian=args.jacobian,
            **extra,
        )
        return out, time.perf_counter() - start

    with torch.inference_mode():
        out, seconds = run(1 if args.sequential else window)
        label = "sequential" if args.sequential else f"parallel (window {window}, jacobian {args.jacobian})"
        print(
            f"{label}: {steps} {args.scheduler} steps, {out.stats.rounds} rounds, "
            f"{out.stats.model_evaluations} model evaluations, {seconds:.2f} s, converged={out.stats.converged}"
        )
        if args.compare and not args.sequential:
            ref, ref_seconds = run(1)
            print(
                f"sequential: {ref.stats.rounds} rounds, {ref.stats.model_evaluations} model evaluations, "
                f"{ref_seconds:.2f} s"
            )
            print(
                f"speed-up {ref_seconds / seconds:.1f}x; max |parallel - sequential| = "
                f"{np.abs(out.images - ref.images).max():.1e} (images in [0, 1])"
            )
    save_grid(out.images, args.out, args.scale)
    print(f"wrote {args.out}")
    return 0


def check_digits(args) -> int:
    pipe = build_pipeline(args.model, "ddim")
    with torch.inference_mode():
        out = pipe(batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed), output_type="pt")
    quality = digit_quality(out.images * 2 - 1)
    print(
        f"{args.num_images} samples (parallel DDIM-50, seed {args.seed}), judged by an SVM trained on real digits "
        f"(held-out accuracy {quality['classifier_accuracy']:.3f}):"
    )
    print(
        f"  mean confidence {quality['mean_confidence']:.3f}, median {quality['median_confidence']:.3f}, "
        f"{100 * quality['confident_fraction']:.0f}% with confidence >= 0.9"
    )
    print(f"  samples per digit 0-9: {quality['digit_counts']}")
    return 0


def train(args) -> int:
    train_digits(args.out, steps=args.steps, seed=args.seed)
    print(f"wrote {args.out}; check it with: pcr-diffusers check-digits --model {args.out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pcr-diffusers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="sample a grid of digits (parallel by default)")
    gen.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="ddpm")
    gen.add_argument("--steps", type=int, default=None, help="default: 1000 for ddpm, 50 otherwise")
    gen.add_argument("--num-images", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="digits.png")
    gen.add_argument("--scale", type=int, default=4, help="enlarge each 8x8 image this many times in the grid")
    gen.add_argument("--sequential", action="store_true", help="run the plain sequential loop instead")
    gen.add_argument("--compare", action="store_true", help="also run sequentially with the same seed and compare")
    gen.add_argument("--model", default=str(DIGITS_DIR), help="a saved unconditional pipeline folder")
    gen.add_argument(
        "--parallel",
        type=int,
        default=None,
        help=f"window: steps per round; default {DEFAULT_PARALLEL} // num_images, at least 8 (measured fastest on 2 "
        "CPU cores, where a call of more than ~128 rows no longer runs faster per row)",
    )
    gen.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    gen.add_argument("--jacobian", choices=tuple(DIFFUSION_JACOBIANS), default="auto")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    gen.set_defaults(run=generate)

    check = commands.add_parser("check-digits", help="how recognisable the model's samples are (needs scikit-learn)")
    check.add_argument("--model", default=str(DIGITS_DIR))
    check.add_argument("--num-images", type=int, default=100)
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=check_digits)

    tr = commands.add_parser("train-digits", help="train the digits DDPM (needs scikit-learn)")
    tr.add_argument("--out", required=True, help="folder to save the pipeline in")
    tr.add_argument("--steps", type=int, default=6000)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(run=train)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
