"""Text-to-image parallel sampling: PCRStableDiffusionPipeline against diffusers' StableDiffusionParadigmsPipeline,
and the other twins against their sequential pipelines.

    python benchmarks/text_to_image.py [--quick] [--device cuda] [--steps 100] [--parallel 16] [--dtype float64]
                                       [--threads 1] [--part all|sd|twins]

Part 1, on the tiny random Stable Diffusion components of the tests (tests/conftest.py), in one run with the same
prompt and seed: the sequential StableDiffusionPipeline with DDPM, ours (`from_pipe` of it), and ParaDiGMS
(`StableDiffusionParadigmsPipeline` with `DDPMParallelScheduler`, the same schedule), each at its default
tolerance and a tighter one. Columns: rounds (sequential model calls), model evaluations (single-step
evaluations, each of 2 x batch rows), wall-clock relative to the sequential pipeline (fastest of `--repeats` runs),
and the largest difference to the sequential result, in [0, 1] pixels and relative to the latents' size. A random
model's chain is ill-conditioned: in float32, rounding alone moves the latents by ~1e-3 (pass `--dtype float64`
to see the solvers' own error).

Part 2, the other twins on their tiny components (tests/conftest.py), each with its components' default scheduler
and `--steps` steps: SD img2img at strength 0.8, SD ControlNet, Flux (16x16 images) and Wan (9 frames of 32x32).
Columns: the sequential pipeline's rounds, ours at the default tolerance (rounds and model evaluations, each of
2 x batch rows with guidance) and the largest latents difference relative to the latents' size.

Random weights make chains unlike a trained model's: how many rounds these take says how the solver runs on a random
chain, not what a trained model needs (benchmarks/sampling.py measures the shipped trained model).

The per-round throughput of a full-size SD 1.5 UNet against the window is in `benchmarks/throughput.py`.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import device_name, print_table, seconds
from diffusers import (
    DDPMParallelScheduler,
    DDPMScheduler,
    FluxPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionParadigmsPipeline,
    StableDiffusionPipeline,
    WanPipeline,
)

from pcr_diffusers.pipelines import PCRAutoPipeline, PCRStableDiffusionPipeline
from pcr_diffusers.sampling import DEFAULT_TOLERANCE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import (  # noqa: E402
    SD_SCHEDULER_CONFIG,
    tiny_controlnet_components,
    tiny_flux_pipeline_components,
    tiny_stable_diffusion_components,
    tiny_wan_components,
)

PROMPT = "a cat and a dog"


# Stable Diffusion 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), spelled out: no hub here.
class CountRows:
    """Counts a module's calls and the rows (batch size) of each."""

    def __init__(self, module):
        self.rows = []
        self._handle = module.register_forward_pre_hook(lambda module, args: self.rows.append(len(args[0])))

    def remove(self):
        self._handle.remove()


def compare_on_tiny_components(args):
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as directory:
        components = tiny_stable_diffusion_components(directory, dtype)
    components["scheduler"] = DDPMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False)
    sequential = StableDiffusionPipeline(**components).to(args.device)
    pcr = PCRStableDiffusionPipeline.from_pipe(sequential)
    paradigms = StableDiffusionParadigmsPipeline.from_pipe(sequential, dtype=dtype)  # else it casts to float32
    paradigms.scheduler = DDPMParallelScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False)
    for pipe in (sequential, pcr, paradigms):
        pipe.set_progress_bar_config(disable=True)

    def run(pipe, output_type="np", **kwargs):
        generator = torch.Generator(args.device).manual_seed(0)
        return pipe(PROMPT, num_inference_steps=args.steps, generator=generator, output_type=output_type, **kwargs)

    window = dict(parallel=args.parallel)
    methods = [
        ("sequential (diffusers, DDPM)", sequential, {}),
        (f"pcr, tolerance {DEFAULT_TOLERANCE:.0e} (default)", pcr, dict(window, tolerance=DEFAULT_TOLERANCE)),
        ("pcr, tolerance 1e-4", pcr, dict(window, tolerance=1e-4)),
        ("paradigms, tolerance 0.1 (default)", paradigms, dict(window, tolerance=0.1)),
        ("paradigms, tolerance 0.01", paradigms, dict(window, tolerance=0.01)),
    ]
    ref_image = run(sequential).images
    ref_latents = run(sequential, "latent").images
    rows, walls = [], []
    for name, pipe, kwargs in methods:
        counter = CountRows(pipe.unet)
        try:
            image = run(pipe, **kwargs).images
        finally:
            counter.remove()
        latents = run(pipe, "latent", **kwargs).images
        walls.append(seconds(lambda pipe=pipe, kwargs=kwargs: run(pipe, **kwargs), args.repeats, args.device))
        rows.append(
            [
                name,
                len(counter.rows),
                sum(counter.rows) // 2,  # each step's evaluation is 2 rows (guidance), batch 1
                f"{walls[-1] / walls[0]:.2f}",  # the first method is the sequential pipeline
                f"{np.abs(image - ref_image).max():.1e}",
                f"{((latents - ref_latents).abs().max() / ref_latents.abs().max()).item():.1e}",
            ]
        )
    print(
        f"Tiny Stable Diffusion (random weights, {args.dtype}), DDPM {args.steps} steps, window {args.parallel}, "
        f"on {device_name(args.device)}; wall-clock: fastest of {args.repeats} after a warm-up"
    )
    print_table(
        ["method", "rounds", "model evals", "time / sequential", "max |image diff|", "max latents diff / max"],
        rows,
    )


def twin_cases(dtype):
    """name: (diffusers pipeline, its tiny components, the call's inputs besides the prompt and steps)."""
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)  # in [0, 1]
    with tempfile.TemporaryDirectory() as directory:
        return {
            "SD img2img, strength 0.8": (
                StableDiffusionImg2ImgPipeline,
                tiny_stable_diffusion_components(directory, dtype),
                dict(image=images, strength=0.8),
            ),
            "SD ControlNet": (
                StableDiffusionControlNetPipeline,
                tiny_controlnet_components(directory, dtype),
                dict(image=images),
            ),
            "Flux, 16x16": (
                FluxPipeline,
                tiny_flux_pipeline_components(directory, dtype),
                dict(height=16, width=16, max_sequence_length=16),
            ),
            "Wan, 9 frames 32x32": (
                WanPipeline,
                tiny_wan_components(directory, dtype),
                dict(height=32, width=32, num_frames=9, max_sequence_length=16),
            ),
        }


def latents_of_run(pipe, args, **kwargs):
    """The output and the final latents (`output_type="latent"`) of a seeded call with `args.steps` steps."""
    generator = torch.Generator(args.device).manual_seed(0)
    output = pipe(PROMPT, num_inference_steps=args.steps, generator=generator, output_type="latent", **kwargs)
    return output, output.images if hasattr(output, "images") else output.frames


def compare_twins(args):
    """Each twin at the default tolerance against its sequential pipeline: rounds, evaluations, latents error."""
    rows = []
    for name, (parent_class, components, inputs) in twin_cases(getattr(torch, args.dtype)).items():
        sequential = parent_class(**components).to(args.device)
        pcr = PCRAutoPipeline.from_pipe(sequential)
        for pipe in (sequential, pcr):
            pipe.set_progress_bar_config(disable=True)

        _, ref = latents_of_run(sequential, args, **inputs)
        out, latents = latents_of_run(pcr, args, **inputs, parallel=args.parallel, tolerance=DEFAULT_TOLERANCE)
        rows.append(
            [
                name,
                type(sequential.scheduler).__name__,
                sequential.num_timesteps,  # the sequential loop's rounds, one model evaluation each
                out.stats.rounds,
                out.stats.model_evaluations,
                f"{((latents.float() - ref.float()).abs().max() / ref.float().abs().max()).item():.1e}",
            ]
        )
    print(
        f"\nThe other twins (tiny random components, {args.dtype}), {args.steps} steps, window {args.parallel}, "
        f"tolerance {DEFAULT_TOLERANCE:g} (the default), on {device_name(args.device)}. Random weights make chains "
        f"unlike a trained model's: these rounds say how the solver runs on a random chain, not what a trained model "
        f"needs."
    )
    print_table(
        ["pipeline", "scheduler", "sequential rounds", "pcr rounds", "pcr model evals", "max latents diff / max"],
        rows,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=16, help="the window of both parallel samplers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--quick", action="store_true", help="25 steps, window 8, one timed run")
    parser.add_argument("--part", default="all", choices=["all", "sd", "twins"], help="sd: part 1; twins: part 2")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.parallel, args.repeats = 25, 8, 1
    if args.part in ("all", "sd"):
        compare_on_tiny_components(args)
    if args.part in ("all", "twins"):
        compare_twins(args)


if __name__ == "__main__":
    main()
