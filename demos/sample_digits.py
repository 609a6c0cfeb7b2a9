"""Digits from the shipped model, sampled in parallel, and how each Jacobian approximation converges.

    python demos/sample_digits.py --out-grid digits_grid.png --out-plot residuals.png

Writes a 10 x 10 grid of parallel DDPM-1000 samples, and a plot of the largest residual per round for DDPM-1000
and DDIM-50 (one image, same seed) with each `jacobian`; prints rounds and the difference to the sequential result.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.cli import save_grid
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline

JACOBIANS = ["secant", "denoiser", "scheduler", "identity"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-grid", default="digits_grid.png")
    parser.add_argument("--out-plot", default="residuals.png")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    ddpm = PCRDDPMPipeline.from_pipe(load_digits_pipeline("ddpm"))
    ddim = PCRDDIMPipeline.from_pipe(load_digits_pipeline("ddim"))
    for pipe in (ddpm, ddim):
        pipe.set_progress_bar_config(disable=True)

    out = ddpm(batch_size=args.num_images, generator=torch.Generator().manual_seed(args.seed), output_type="np")
    save_grid(out.images, args.out_grid, scale=4)
    print(f"wrote {args.out_grid}: {args.num_images} samples, DDPM-1000 in {out.stats.rounds} rounds")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, pipe, steps) in zip(axes, [("DDPM-1000", ddpm, 1000), ("DDIM-50", ddim, 50)], strict=True):

        def run(pipe=pipe, steps=steps, **kwargs):
            return pipe(
                generator=torch.Generator().manual_seed(args.seed),
                num_inference_steps=steps,
                output_type="np",
                **kwargs,
            )

        ref = run(parallel=1).images
        for jacobian in JACOBIANS:
            result = run(jacobian=jacobian)
            error = np.abs(result.images - ref).max()
            print(
                f"{name:9s} {jacobian:9s} {result.stats.rounds:3d} rounds, {result.stats.model_evaluations:5d} "
                f"model evaluations, max |diff| to sequential {error:.1e}"
            )
            residuals = result.stats.residuals
            ax.semilogy(range(1, len(residuals) + 1), residuals, marker=".", label=f"{jacobian} ({len(residuals)})")
        ax.set(title=f"{name}, window {min(steps, 64)}", xlabel="round", ylabel="largest residual in the window")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out_plot, dpi=120)
    print(f"wrote {args.out_plot}")


if __name__ == "__main__":
    main()
