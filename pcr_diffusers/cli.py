"""The `pcr-diffusers` command: generate digits in parallel (or sequentially), compare both, train the model.

Every argument is checked before any work (loading the model, sampling, training): a bad one is a usage error,
printed as one line after the usage, with exit status 2. Any other error prints one line and exits with 1, Ctrl-C
with 130; `pcr-diffusers --debug ...` shows the traceback instead. Outputs appear whole or not at all.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from io import BytesIO
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
from PIL import Image, ImageOps

from .digits import DIGITS_DIR, digit_quality, train_digits
from .digits_guided import guided_digit_quality, train_guided_digits
from .pipelines import PCRDDIMPipeline, PCRDDPMPipeline
from .sampling import DEFAULT_PARALLEL, DEFAULT_TOLERANCE, DIFFUSION_JACOBIANS

SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
}
# `generate` options that only the parallel solve uses: an error with `--sequential`, rather than ignored.
PARALLEL_ONLY = ("parallel", "tolerance", "jacobian", "compare")
# `train_digits` warms the learning rate up over a tenth of the run, so a run of fewer than 10 steps has no warm-up
# step and divides by zero. Such a run leaves the model as noise anyway: refusing it is simpler and clearer than
# teaching the schedule about runs too short to be of any use.
MIN_TRAIN_STEPS = 10


# Argument types: argparse prints their `ArgumentTypeError` as a one-line usage error naming the option.


def _parse(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: str) -> int:
    value = _parse(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def seed(text: str) -> int:
    value = _parse(text, int)
    if not 0 <= value < 2**64:  # what `torch.Generator.manual_seed` takes, without wrapping negative seeds around
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {value}")
    return value


def train_steps(text: str) -> int:
    value = _parse(text, int)
    if value < MIN_TRAIN_STEPS:
        raise argparse.ArgumentTypeError(f"must be an integer of at least {MIN_TRAIN_STEPS}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def eta(text: str) -> float:
    value = _parse(text, float)
    # DDIM's step noise is eta times DDPM's; above 1 it can outgrow the step's variance and the step returns NaN
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] (0: deterministic DDIM), got {text!r}")
    return value


def default_steps(scheduler: str) -> int:
    return 1000 if scheduler == "ddpm" else 50


def image_format(path: str | Path) -> str | None:
    """PIL's format for `path`'s suffix (`".png"` -> `"PNG"`), or None unless PIL can write an RGB image (as the
    grid is) in it."""
    pil_format = Image.registered_extensions().get(Path(path).suffix.lower())
    if pil_format is None:
        return None
    try:
        Image.new("RGB", (1, 1)).save(BytesIO(), format=pil_format)
    except (KeyError, OSError, ValueError):  # no writer for the format, or none for RGB
        return None
    return pil_format


# Checks that need more than one argument or the file system; `parser.error` exits with status 2.


def existing_ancestor(path: Path) -> Path:
    """The nearest existing path above `path`: the folder that `path` (and any missing folders) would go in."""
    return next(folder for folder in Path(path).absolute().parents if folder.exists())


def check_model(parser: argparse.ArgumentParser, model: str) -> dict:
    """The scheduler config of the pipeline saved in the folder `model`, read without loading the model (and
    without ever taking `model` for a hub id)."""
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        parser.error(f"argument --model: {model} is not a folder holding a saved pipeline (no model_index.json)")
    try:
        return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as error:
        parser.error(f"argument --model: cannot read the scheduler config of {model}: {error}")


def check_image_out(parser: argparse.ArgumentParser, out: str) -> None:
    """`out` names a writable file in an existing folder, with a suffix PIL can write an RGB image as."""
    path = Path(out)
    if path.is_dir():
        parser.error(f"argument --out: {out} is a folder, not an image file")
    folder = path.parent
    if not folder.is_dir():
        parser.error(f"argument --out: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"argument --out: the folder {folder} is not writable")
    if image_format(path) is None:
        parser.error(
            f"argument --out: PIL cannot write an RGB image as {path.suffix or 'a file without suffix'!r}; "
            "use e.g. .png"
        )


def check_pipeline_out(parser: argparse.ArgumentParser, out: str) -> None:
    """`out` is a new or empty folder that can be created: training is not started only to fail at saving."""
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        parser.error(f"argument --out: {out} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        parser.error(f"argument --out: {out} already exists and is not empty; remove it or choose a new folder")
    ancestor = existing_ancestor(path)
    if not ancestor.is_dir():
        parser.error(f"argument --out: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        parser.error(f"argument --out: cannot create {out}: the folder {ancestor} is not writable")


def check_generate_args(parser: argparse.ArgumentParser, args) -> None:
    if args.eta is not None and args.scheduler != "ddim":
        parser.error(f"argument --eta: only the ddim scheduler has an eta, not {args.scheduler}")
    if args.sequential:
        given = [f"--{name}" for name in PARALLEL_ONLY if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"argument --sequential: not allowed with {', '.join(given)} (parallel sampling only)")
    train_timesteps = check_model(parser, args.model).get("num_train_timesteps", 1000)
    steps = args.steps or default_steps(args.scheduler)
    if steps > train_timesteps:
        parser.error(f"argument --steps: {steps} steps, but the model was trained with {train_timesteps} timesteps")
    check_image_out(parser, args.out)


def check_digits_args(parser: argparse.ArgumentParser, args) -> None:
    check_model(parser, args.model)


def check_train_args(parser: argparse.ArgumentParser, args) -> None:
    check_pipeline_out(parser, args.out)


def build_pipeline(model: str | Path, scheduler: str) -> PCRDDPMPipeline | PCRDDIMPipeline:
    """A PCR pipeline for the unconditional pipeline saved in `model`, with its scheduler converted to `scheduler`."""
    base = DDPMPipeline.from_pretrained(model)
    pipeline_class = PCRDDIMPipeline if scheduler == "ddim" else PCRDDPMPipeline
    pipe = pipeline_class(unet=base.unet, scheduler=SCHEDULERS[scheduler].from_config(base.scheduler.config))
    pipe.set_progress_bar_config(leave=False)
    return pipe


def save_grid(images: np.ndarray, path: str | Path, scale: int) -> None:
    """Saves `(N, H, W, C)` images in [0, 1] as one grid PNG, each image enlarged `scale` times (nearest) and framed
    by a gray border of `scale` pixels so neighbouring images stay apart.

    The image is written to a hidden file beside `path` and renamed onto it, so `path` is never left half-written.
    """
    pils = PCRDDPMPipeline.numpy_to_pil(images)
    pils = [ImageOps.expand(im.resize((im.width * scale, im.height * scale), 0), scale, fill=96) for im in pils]
    cols = int(np.ceil(np.sqrt(len(pils))))
    rows = int(np.ceil(len(pils) / cols))
    pils += [pils[0].point(lambda _: 0)] * (rows * cols - len(pils))  # black cells fill the last row
    grid = make_image_grid(pils, rows=rows, cols=cols)
    path = Path(path)
    pil_format = image_format(path)
    if pil_format is None:
        raise ValueError(f"PIL cannot write an RGB image as {path.suffix!r} (the suffix of {path}); use e.g. .png")
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")  # same folder: the rename is atomic
    try:
        grid.save(partial, format=pil_format)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def generate(args) -> int:
    pipe = build_pipeline(args.model, args.scheduler)
    steps = args.steps or default_steps(args.scheduler)
    extra = {} if args.eta is None else {"eta": args.eta}
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    jacobian = args.jacobian or "auto"

    window = args.parallel or max(8, DEFAULT_PARALLEL // args.num_images)

    def run(parallel):
        start = time.perf_counter()
        out = pipe(
            batch_size=args.num_images,
            generator=torch.Generator().manual_seed(args.seed),
            num_inference_steps=steps,
            output_type="np",
            parallel=parallel,
            tolerance=tolerance,
            jacobian=jacobian,
            **extra,
        )
        return out, time.perf_counter() - start

    with torch.inference_mode():
        out, seconds = run(1 if args.sequential else window)
        label = "sequential" if args.sequential else f"parallel (window {window}, jacobian {jacobian})"
        print(
            f"{label}: {steps} {args.scheduler} steps, {out.stats.rounds} rounds, "
            f"{out.stats.model_evaluations} model evaluations, {seconds:.2f} s, converged={out.stats.converged}"
        )
        if args.compare:
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


def train_into(out: str, train_fn):
    """`train_fn(folder)` saving into a hidden folder in the nearest existing folder above `out`, then renamed to
    `out`: all of it appears or none. Returns what `train_fn` returns."""
    out = Path(out).absolute()
    partial = existing_ancestor(out) / f".{out.name}.partial-{os.getpid()}"
    try:
        trained = train_fn(partial)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            out.rmdir()  # empty (checked before training); renaming onto a folder fails on Windows
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return trained


def train(args) -> int:
    train_into(args.out, lambda folder: train_digits(folder, steps=args.steps, seed=args.seed))
    print(f"wrote {args.out}; check it with: pcr-diffusers check-digits --model {args.out}")
    return 0


def train_guided(args) -> int:
    pipe = train_into(
        args.out,
        lambda folder: train_guided_digits(folder, steps=args.steps, vae_steps=args.vae_steps, seed=args.seed),
    )
    print(f"wrote {args.out}; load it with pcr_diffusers.digits_guided.load_guided_digits_pipeline(path=...)")
    pipe.set_progress_bar_config(leave=False)
    with torch.inference_mode():
        quality = guided_digit_quality(pipe)
    print(
        f"  {quality['label_accuracy']:.0%} of {sum(quality['digit_counts'])} samples (DDIM-50, guidance scale 4) "
        "read as the digit asked for by an SVM trained on real digits"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pcr-diffusers", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error or Ctrl-C, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="sample a grid of digits (parallel by default)")
    gen.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="ddpm")
    gen.add_argument("--steps", type=positive_int, default=None, help="default: 1000 for ddpm, 50 otherwise")
    gen.add_argument("--num-images", type=positive_int, default=16)
    gen.add_argument("--seed", type=seed, default=0)
    gen.add_argument("--out", default="digits.png", help="the grid image; its suffix picks the format")
    gen.add_argument(
        "--scale", type=positive_int, default=4, help="enlarge each 8x8 image this many times in the grid"
    )
    gen.add_argument("--sequential", action="store_true", help="run the plain sequential loop instead")
    gen.add_argument("--compare", action="store_true", help="also run sequentially with the same seed and compare")
    gen.add_argument("--model", default=str(DIGITS_DIR), help="a saved unconditional pipeline folder")
    gen.add_argument(
        "--parallel",
        type=positive_int,
        default=None,
        help=f"window: steps per round; default {DEFAULT_PARALLEL} // num_images, at least 8 (measured fastest on 2 "
        "CPU cores, where a call of more than ~128 rows no longer runs faster per row)",
    )
    gen.add_argument("--tolerance", type=positive_float, default=None, help=f"default: {DEFAULT_TOLERANCE:g}")
    gen.add_argument("--jacobian", choices=tuple(DIFFUSION_JACOBIANS), default=None, help="default: auto")
    gen.add_argument("--eta", type=eta, default=None, help="DDIM's eta, in [0, 1] (--scheduler ddim only; default 0)")
    gen.set_defaults(run=generate, check_args=check_generate_args)

    check = commands.add_parser("check-digits", help="how recognisable the model's samples are (needs scikit-learn)")
    check.add_argument("--model", default=str(DIGITS_DIR))
    check.add_argument("--num-images", type=positive_int, default=100)
    check.add_argument("--seed", type=seed, default=0)
    check.set_defaults(run=check_digits, check_args=check_digits_args)

    tr = commands.add_parser("train-digits", help="train the digits DDPM (needs scikit-learn)")
    tr.add_argument("--out", required=True, help="a new (or empty) folder to save the pipeline in")
    tr.add_argument("--steps", type=train_steps, default=6000, help=f"at least {MIN_TRAIN_STEPS}")
    tr.add_argument("--seed", type=seed, default=0)
    tr.set_defaults(run=train, check_args=check_train_args)

    guided = commands.add_parser(
        "train-guided-digits", help="train the class-conditional digits DiT and its VAE (needs scikit-learn)"
    )
    guided.add_argument("--out", required=True, help="a new (or empty) folder to save the DiTPipeline in")
    guided.add_argument("--steps", type=train_steps, default=4000, help=f"DiT steps, at least {MIN_TRAIN_STEPS}")
    guided.add_argument("--vae-steps", type=train_steps, default=1000, help=f"VAE steps, at least {MIN_TRAIN_STEPS}")
    guided.add_argument("--seed", type=seed, default=0)
    guided.set_defaults(run=train_guided, check_args=check_train_args)

    args = parser.parse_args(argv)
    try:
        args.check_args(commands.choices[args.command], args)
        return args.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"{parser.prog}: error: {str(error) or type(error).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
