"""Parallel sampling on the shipped digits model, side by side in one run: diffusers' sequential pipelines,
diffusers' ParaDiGMS machinery (`DDPMParallelScheduler` / `DDIMParallelScheduler` with its Picard loop), and
pcr-diffusers with each Jacobian, at the default window and tolerance.

    python benchmarks/sampling.py                  # table + sampling.png + tradeoff.png
    python benchmarks/sampling.py --quick          # DDIM-25, batch 1 only
    python benchmarks/sampling.py --multistep      # the multistep table only (DPM-Solver++, UniPC, PNDM, ...)
    python benchmarks/sampling.py --targets        # the rounds and wall-clock targets, with pass/fail
    python benchmarks/sampling.py --guided         # the guided DiT model: ours and Picard against sequential
    python benchmarks/sampling.py --bounds         # the round targets against exact Newton (dense Jacobians)
    python benchmarks/sampling.py --windows 64 256 # parallel="auto" against fixed windows and ParaDiGMS, timed

Columns: rounds (sequential batched model calls), model evaluations (single steps), wall-clock speed-up over the
sequential pipeline (measured in this run), and the largest difference to the sequential image in [0, 1] pixels.
`tradeoff.png` plots rounds against that error over a sweep of tolerances, one curve per method: the fair
comparison, since each method's tolerance means something different. A last table times DDPM-1000 (batch 1,
window 64) at two tolerances per method, fastest of 3 interleaved runs, for the wall-clock at matched error.
The multistep table gives, per scheduler, the fewest rounds whose result stays within 1e-3 of diffusers' loop over
a sweep of tolerances, for our default Jacobian and for Picard iteration (`identity`, ParaDiGMS' update) on the same
scheduler, window = steps, batch 1.
"""

import argparse
import inspect
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from common import device_name, print_table
from diffusers import (
    DDIMParallelScheduler,
    DDIMPipeline,
    DDIMScheduler,
    DDPMParallelScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from paradigms import paradigms_sample

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.core import Jacobian, newton_solve
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline
from pcr_diffusers.sampling import (
    DEFAULT_PARALLEL,
    DEFAULT_TOLERANCE,
    DenoisingChain,
    denoise_parallel,
    denoise_sequential,
    step_tolerances,
)
from pcr_diffusers.schedulers import PCRDDIMScheduler, PCRDDPMScheduler

CONFIGS = {  # name: (scheduler class, parallel scheduler class, steps)
    "DDPM-1000": (DDPMScheduler, DDPMParallelScheduler, 1000),
    "DDIM-100": (DDIMScheduler, DDIMParallelScheduler, 100),
    "DDIM-50": (DDIMScheduler, DDIMParallelScheduler, 50),
    "DDIM-25": (DDIMScheduler, DDIMParallelScheduler, 25),
    "Euler-50": (EulerDiscreteScheduler, None, 50),
}
JACOBIANS = ["secant", "denoiser", "scheduler", "identity"]
MULTISTEP = [  # name, scheduler class, its options, steps
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {}, 20),
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {}, 25),
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {}, 50),
    ("DPM-Solver++ 2M Karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 25),
    ("SDE-DPM-Solver++ 2M", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, 25),
    ("UniPC", UniPCMultistepScheduler, {}, 20),
    ("PNDM (SD 1.5's PLMS)", PNDMScheduler, {"skip_prk_steps": True}, 50),
    ("LMS", LMSDiscreteScheduler, {}, 50),
    ("DEIS", DEISMultistepScheduler, {}, 25),
]
MATCHED_ERROR = 1e-3
PARADIGMS_DEFAULTS = {"parallel": 10, "tolerance": 0.1}  # StableDiffusionParadigmsPipeline's


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def to_images(latents):
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


class Setup:
    """The shipped model with one scheduler: runs each method on the same seed and batch."""

    def __init__(self, unet, config, name, batch, seed=0):
        self.unet, self.batch, self.seed = unet, batch, seed
        scheduler_class, self.parallel_class, self.steps = CONFIGS[name]
        self.scheduler = scheduler_class.from_config(config)
        pcr_class = PCRDDIMPipeline if scheduler_class is DDIMScheduler else PCRDDPMPipeline
        self.pcr = pcr_class(unet=unet, scheduler=self.scheduler)
        self.pcr.set_progress_bar_config(disable=True)

    def generator(self):
        return torch.Generator().manual_seed(self.seed)

    def sequential(self):
        """diffusers' own loop: its DDPM/DDIM pipeline, or the loop its pipelines run for Euler."""
        if isinstance(self.scheduler, (DDPMScheduler, DDIMScheduler)):
            pipe_class = DDPMPipeline if isinstance(self.scheduler, DDPMScheduler) else DDIMPipeline
            pipe = pipe_class(unet=self.unet, scheduler=self.scheduler)
            pipe.set_progress_bar_config(disable=True)
            return pipe(self.batch, self.generator(), num_inference_steps=self.steps, output_type="np").images
        scheduler, generator = self.scheduler, self.generator()
        scheduler.set_timesteps(self.steps)
        x = randn_tensor((self.batch, 1, 8, 8), generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(self.unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        return to_images(x)

    def ours(self, jacobian, parallel=DEFAULT_PARALLEL, tolerance=DEFAULT_TOLERANCE):
        out = self.pcr(
            self.batch,
            self.generator(),
            num_inference_steps=self.steps,
            output_type="np",
            parallel=parallel,
            tolerance=tolerance,
            jacobian=jacobian,
        )
        return out.images, out.stats.rounds, out.stats.model_evaluations

    def paradigms(self, parallel, tolerance):
        scheduler = self.parallel_class.from_config(self.scheduler.config)
        scheduler.set_timesteps(self.steps)
        generator = self.generator()
        latents = randn_tensor((self.batch, 1, 8, 8), generator=generator)
        x, rounds, evaluations = paradigms_sample(self.unet, scheduler, latents, generator, parallel, tolerance)
        return to_images(x), rounds, evaluations


def table(unet, config, names, batches):
    rows, speedups = [], {}
    for name in names:
        for batch in batches:
            setup = Setup(unet, config, name, batch)
            ref, t_seq = timed(setup.sequential)
            rows.append([name, batch, "sequential (diffusers)", setup.steps, setup.steps, "1.0x", "0"])
            methods = []
            if setup.parallel_class is not None:
                methods.append(
                    (
                        f"ParaDiGMS (W={PARADIGMS_DEFAULTS['parallel']}, tol 0.1)",
                        lambda s=setup: s.paradigms(**PARADIGMS_DEFAULTS),
                    )
                )
                methods.append(
                    (f"ParaDiGMS (W={DEFAULT_PARALLEL}, tol 0.1)", lambda s=setup: s.paradigms(DEFAULT_PARALLEL, 0.1))
                )
            for jacobian in JACOBIANS:
                methods.append((f"ours, {jacobian}", lambda s=setup, j=jacobian: s.ours(j)))
            for label, run in methods:
                (images, rounds, evaluations), t = timed(run)
                speedups[(name, batch, label)] = t_seq / t
                error = np.abs(images - ref).max()
                rows.append([name, batch, label, rounds, evaluations, f"{t_seq / t:.1f}x", f"{error:.1e}"])
    print_table(["sampler", "batch", "method", "rounds", "model evals", "speed-up", "max |diff|"], rows)
    return speedups


def sweep(unet, config, out):
    """Rounds against final error over tolerances, batch 1, every method with the same window."""
    panels = [("DDPM-1000", DEFAULT_PARALLEL), ("DDPM-1000", 1000), ("DDIM-50", 50)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (name, window) in zip(axes, panels, strict=True):
        setup = Setup(unet, config, name, batch=1)
        ref = setup.sequential()
        curves = {"ParaDiGMS": [setup.paradigms(window, tol) for tol in (0.3, 0.1, 0.03, 0.01, 0.003)]}
        for jacobian in JACOBIANS:
            curves[jacobian] = [setup.ours(jacobian, window, tol) for tol in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4)]
        print(f"\n{name}, window {window}, batch 1: rounds (error) per tolerance")
        for label, points in curves.items():
            errors = [max(np.abs(images - ref).max(), 1e-8) for images, _, _ in points]
            rounds = [r for _, r, _ in points]
            print(f"  {label:10s} " + "  ".join(f"{r} ({e:.0e})" for r, e in zip(rounds, errors, strict=True)))
            ax.plot(errors, rounds, marker="o", label=label)
        ax.set(
            xscale="log",
            xlabel="max |parallel - sequential| (pixels in [0, 1])",
            ylabel="rounds",
            title=f"{name}, window {window}",
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def matched_error_timing(unet, config, repeats=3):
    """DDPM-1000, batch 1, window 64: wall-clock of ParaDiGMS and ours at two tolerances each, interleaved runs."""
    setup = Setup(unet, config, "DDPM-1000", batch=1)
    ref = setup.sequential()
    methods = {"sequential (diffusers)": lambda: (setup.sequential(), 1000, 1000)}
    for tol in (0.1, 0.3):
        methods[f"ParaDiGMS, tol {tol}"] = lambda tol=tol: setup.paradigms(DEFAULT_PARALLEL, tol)
    for tol in (3e-3, 1e-2):
        methods[f"ours, secant, tol {tol:.0e}"] = lambda tol=tol: setup.ours("secant", DEFAULT_PARALLEL, tol)
    best, results = {}, {}
    for _ in range(repeats):
        for label, run in methods.items():
            results[label], t = timed(run)
            best[label] = min(best.get(label, float("inf")), t)
    seq = best["sequential (diffusers)"]
    rows = [
        [
            label,
            rounds,
            evaluations,
            f"{best[label]:.2f}",
            f"{seq / best[label]:.1f}x",
            f"{np.abs(images - ref).max():.1e}",
        ]
        for label, (images, rounds, evaluations) in results.items()
    ]
    print(f"\nDDPM-1000, batch 1, window {DEFAULT_PARALLEL}: fastest of {repeats} interleaved runs")
    print_table(["method", "rounds", "model evals", "seconds", "speed-up", "max |diff|"], rows)


def multistep(unet, config, tolerances=(3e-2, 1e-2, 3e-3, 1e-3)):
    """Rounds within `MATCHED_ERROR` of diffusers' loop for the multistep schedulers, ours against Picard."""
    rows = []
    for name, scheduler_class, options, steps in MULTISTEP:
        scheduler = scheduler_class.from_config(config, **options)
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        x = randn_tensor((1, 1, 8, 8), generator=generator) * scheduler.init_noise_sigma
        # diffusers' loop, drawing step noise from the generator as pipelines do
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        for t in scheduler.timesteps:
            model_output = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample
        ref = to_images(x)
        pcr = PCRDDPMPipeline(unet=unet, scheduler=scheduler_class.from_config(config, **options))
        pcr.set_progress_bar_config(disable=True)
        row = [f"{name}-{steps}"]
        for jacobian in ("auto", "identity"):
            points = []
            for tolerance in tolerances:
                out = pcr(
                    1,
                    torch.Generator().manual_seed(0),
                    steps,
                    "np",
                    parallel=steps,
                    tolerance=tolerance,
                    jacobian=jacobian,
                )
                points.append((out.stats.rounds, np.abs(out.images - ref).max(), tolerance))
            default = pcr(1, torch.Generator().manual_seed(0), steps, "np", parallel=steps, jacobian=jacobian)
            matched = min((p for p in points if p[1] <= MATCHED_ERROR), default=None)
            row.append(f"{matched[0]} ({matched[1]:.0e}, tol {matched[2]:g})" if matched else "none")
            row.append(f"{default.stats.rounds} ({np.abs(default.images - ref).max():.0e})")
        rows.append(row)
    print(
        f"\nMultistep schedulers, batch 1, window = steps: fewest rounds within {MATCHED_ERROR:g} of diffusers' loop"
    )
    print_table(
        ["scheduler", "ours (error, tolerance)", "ours at default", "Picard (error, tolerance)", "Picard at default"],
        rows,
    )


def plot_speedups(speedups, out):
    labels = sorted({label for _, _, label in speedups}, key=lambda s: (not s.startswith("ours"), s))
    groups = sorted({(name, batch) for name, batch, _ in speedups}, key=lambda g: (g[1], list(CONFIGS).index(g[0])))
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(groups)), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [speedups.get((name, batch, label), 0) for name, batch in groups]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=label)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{n}\nbatch {b}" for n, b in groups])
    ax.set(ylabel="wall-clock speed-up over sequential", title=f"digits model, {device_name('cpu')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


# Issue 14's targets on the shipped model, batch 1, default tolerance and Jacobian: (config, window, most rounds)
ROUND_TARGETS = [("DDPM-1000", 64, 20), ("DDPM-1000", 1000, 8), ("DDIM-100", 100, 6), ("DDIM-50", 50, 5)]
PARADIGMS_WINDOWS = (8, 16, 32, 64, 128, 256)


def fastest(run, repeats=2):
    """The result of `run()` and its fastest time over `repeats` runs."""
    results = [timed(run) for _ in range(repeats)]
    return results[0][0], min(t for _, t in results)


def targets(unet, config):
    """One table of the targets with pass/fail: rounds within `MATCHED_ERROR` of the sequential image; wall-clock
    of DDPM-1000 with `parallel="auto"` against diffusers' sequential pipeline (batch 1 and 16) and against the
    ParaDiGMS loop at its fastest window within `MATCHED_ERROR` (batch 1), each the fastest of 2 runs."""
    rows = []
    for name, window, most in ROUND_TARGETS:
        setup = Setup(unet, config, name, batch=1)
        images, rounds, _ = setup.ours("auto", window)
        error = np.abs(images - setup.sequential()).max()
        ok = rounds <= most and error <= MATCHED_ERROR
        rows.append([f"{name}, window {window}: rounds", f"<= {most}", f"{rounds} (error {error:.0e})", ok])
    for batch, least in ((1, 6.0), (16, 1.5)):
        setup = Setup(unet, config, "DDPM-1000", batch)
        ref, t_seq = fastest(setup.sequential)
        (images, rounds, _), t = fastest(lambda s=setup: s.ours("auto", "auto"))
        error = np.abs(images - ref).max()
        measured = f"{t_seq / t:.1f}x ({rounds} rounds, error {error:.0e})"
        rows.append([f"DDPM-1000, batch {batch}, parallel='auto', over sequential", f">= {least}x", measured, None])
        rows[-1][-1] = t_seq / t >= least and error <= MATCHED_ERROR
        if batch == 1:
            ours_seconds, paradigms = t, []
            for window in PARADIGMS_WINDOWS:
                (images, rounds, _), t = fastest(lambda w=window, s=setup: s.paradigms(w, 0.1))
                paradigms.append((t, window, rounds, np.abs(images - ref).max()))
            matched = [p for p in paradigms if p[3] <= MATCHED_ERROR] or paradigms
            t, window, rounds, error = min(matched)
            measured = f"ours {t_seq / ours_seconds:.1f}x, ParaDiGMS {t_seq / t:.1f}x (W={window}, error {error:.0e})"
            rows.append(["DDPM-1000, batch 1: ahead of ParaDiGMS at its best window", "ours faster", measured, None])
            rows[-1][-1] = ours_seconds < t
    print(
        f"\nTargets (shipped model, tolerance {DEFAULT_TOLERANCE}, Jacobian auto, one seed; rounds count only within "
        f"{MATCHED_ERROR:g} of the sequential image; wall-clock: fastest of 2 runs on {device_name('cpu')})"
    )
    print_table(["target", "goal", "measured", "result"], [[*row[:3], "pass" if row[3] else "FAIL"] for row in rows])


class FiniteDifferenceJacobian(Jacobian):
    """The dense Jacobian of a whole step, the model included, by forward differences: each of a flat state's d
    values moved by `h`, in the same call (d + 1 rows per step). Newton's method up to O(h), for a small state."""

    structure = "dense"

    def __init__(self, h=1e-3):
        self.h = h

    def evaluate(self, step, ls, x_prev):  # x_prev (n, d)
        n, d = x_prev.shape
        moved = (x_prev.unsqueeze(1) + self.h * torch.eye(d, dtype=x_prev.dtype)).reshape(n * d, d)
        f_moved = step(ls.repeat_interleave(d), moved).reshape(n, d, d)
        fx = step(ls, x_prev)  # after the moved rows: the chain's predictor reads the last call
        return fx, ((f_moved - fx.unsqueeze(1)) / self.h).transpose(1, 2)  # [l, i, j] = d f_i / d x_j


def exact_newton_rounds(unet, config, name, window, tolerance, seed=0):
    """Rounds and error of Newton's method with the steps' dense Jacobians (`FiniteDifferenceJacobian`) under our
    acceptance rule and predictor, against our default Jacobian; batch 1."""
    scheduler_class = PCRDDIMScheduler if CONFIGS[name][0] is DDIMScheduler else PCRDDPMScheduler

    def chain_and_latents():
        scheduler = scheduler_class.from_config(config)
        scheduler.set_timesteps(CONFIGS[name][2])
        generator = torch.Generator().manual_seed(seed)
        latents = randn_tensor((1, 1, 8, 8), generator=generator) * scheduler.init_noise_sigma
        noise = scheduler.draw_noise(latents.shape, generator=generator)
        return DenoisingChain(lambda x, t: unet(x, t).sample, scheduler, noise), latents

    chain, latents = chain_and_latents()
    ref = to_images(denoise_sequential(chain, latents)[0])
    ours, stats = denoise_parallel(*chain_and_latents(), parallel=window, tolerance=tolerance)
    chain, latents = chain_and_latents()
    steps, shape = len(chain), latents.shape
    result = newton_solve(
        lambda ls, x: chain(ls, x.reshape(len(ls), *shape)).flatten(1),
        latents.flatten(),
        steps,
        jacobian=FiniteDifferenceJacobian(),
        tol=step_tolerances(tolerance, chain.scheduler.state_scale(torch.arange(steps))),
        window=window,
        extend=lambda ls, x: chain.extend(ls, x.reshape(shape)).flatten(1),
    )
    exact = to_images(result.states[-1].reshape(shape))
    return (stats.rounds, np.abs(to_images(ours) - ref).max()), (result.num_iters, np.abs(exact - ref).max())


def bounds(unet, config, looser=100):
    """The round targets against exact Newton, at the default tolerance and at `looser` times it."""
    rows = []
    for name, window, most in ROUND_TARGETS:
        row = [f"{name}, window {window}", f"<= {most}"]
        for tolerance in (DEFAULT_TOLERANCE, looser * DEFAULT_TOLERANCE):
            ours, exact = exact_newton_rounds(unet, config, name, window, tolerance)
            row += [f"{ours[0]} ({ours[1]:.0e})", f"{exact[0]} ({exact[1]:.0e})"]
        rows.append(row)
    print(
        f"\nRound targets against exact Newton (dense finite-difference Jacobians of the whole step, 65 rows per "
        f"step; batch 1, seed 0; tolerance {DEFAULT_TOLERANCE:g} and {looser * DEFAULT_TOLERANCE:g}; error in "
        "[0, 1] pixels)"
    )
    tolerances = ("default", f"{looser}x")
    columns = [f"{who}, {tol}" for tol in tolerances for who in ("ours", "exact Newton")]
    print_table(["target", "goal", *columns], rows)


def windows(unet, config, name, batch, sizes, paradigms_window=64):
    """Wall-clock of `parallel="auto"` against fixed windows, sequential and ParaDiGMS, side by side in one run."""
    setup = Setup(unet, config, name, batch)
    ref, t_seq = fastest(setup.sequential)
    runs = [("auto", lambda: setup.ours("auto", "auto"))]
    runs += [(f"window {size}", lambda size=size: setup.ours("auto", size)) for size in sizes]
    if setup.parallel_class is not None:
        runs.append((f"ParaDiGMS, window {paradigms_window}", lambda: setup.paradigms(paradigms_window, 0.1)))
    rows = [["sequential", setup.steps, setup.steps, f"{t_seq:.2f}", "1.0x", 0]]
    for label, run in runs:
        (images, rounds, evaluations), t = fastest(run)
        rows.append([label, rounds, evaluations, f"{t:.2f}", f"{t_seq / t:.1f}x", f"{np.abs(images - ref).max():.0e}"])
    print(f"\n{name}, batch {batch}, fastest of 2 runs on {device_name('cpu')}")
    print_table(["method", "rounds", "model evals", "seconds", "speed-up", "max |diff|"], rows)


GUIDED = [("DDIM-50", "ddim", 50), ("DDPM-250", "ddpm", 250)]


def guided(windows=(16, None), guidance_scale=4.0, seeds=(0, 1, 2)):
    """The shipped guided model (class-conditional DiT, `load_guided_digits_pipeline`), CFG 4, one of each digit:
    rounds against the sequential loop (`DiTPipeline`) for ours and Picard (`jacobian="identity"`, ParaDiGMS'
    update) at the default tolerance, the largest error over `seeds`."""
    from pcr_diffusers import load_guided_digits_pipeline
    from pcr_diffusers.pipelines import PCRDiTPipeline

    rows = []
    labels = list(range(10))
    for name, scheduler, steps in GUIDED:
        pipe = load_guided_digits_pipeline(scheduler)
        pipe.set_progress_bar_config(disable=True)
        pcr = PCRDiTPipeline.from_pipe(pipe)
        pcr.set_progress_bar_config(disable=True)

        def run(pipeline, seed, steps=steps, **kwargs):
            torch.manual_seed(seed)  # DiTPipeline's scheduler steps draw from the global RNG
            generator = torch.Generator().manual_seed(seed)
            kwargs = dict(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps, **kwargs)
            return pipeline(generator=generator, output_type="np", **kwargs)

        refs = [run(pipe, seed).images for seed in seeds]
        for window in windows:
            row = [name, window or steps, steps]
            for jacobian in ("auto", "identity"):
                outs = [run(pcr, seed, parallel=window or steps, jacobian=jacobian) for seed in seeds]
                rounds = "/".join(str(out.stats.rounds) for out in outs)
                error = max(np.abs(out.images - ref).max() for out, ref in zip(outs, refs, strict=True))
                row.append(f"{rounds} ({error:.0e})")
            rows.append(row)
    print(f"\nGuided digits (DiT, CFG {guidance_scale:g}, batch 10), rounds per seed {seeds} (largest error)")
    print_table(["sampler", "window", "sequential", "ours", "Picard"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="sampling.png")
    parser.add_argument("--sweep-out", default="tradeoff.png")
    parser.add_argument("--quick", action="store_true", help="DDIM-25 at batch 1, no sweep")
    parser.add_argument("--multistep", action="store_true", help="the multistep table only")
    parser.add_argument("--targets", action="store_true", help="the targets table only, with pass/fail")
    parser.add_argument("--guided", action="store_true", help="the guided DiT table only")
    parser.add_argument("--bounds", action="store_true", help="the round targets against exact Newton only")
    parser.add_argument(
        "--windows", type=int, nargs="+", help="only time 'auto' against these windows (first config, first batch)"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = load_digits_pipeline()
    print(
        f"digits model ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M parameters) on "
        f"{device_name('cpu')}; ours at window {DEFAULT_PARALLEL}, tolerance {DEFAULT_TOLERANCE}"
    )
    if args.quick:
        table(pipe.unet, pipe.scheduler.config, ["DDIM-25"], [1])
        return
    if args.multistep:
        multistep(pipe.unet, pipe.scheduler.config)
        return
    if args.targets:
        targets(pipe.unet, pipe.scheduler.config)
        return
    if args.guided:
        guided()
        return
    if args.bounds:
        bounds(pipe.unet, pipe.scheduler.config)
        return
    if args.windows:
        windows(pipe.unet, pipe.scheduler.config, args.configs[0], args.batch[0], args.windows)
        return
    speedups = table(pipe.unet, pipe.scheduler.config, args.configs, args.batch)
    plot_speedups(speedups, args.out)
    sweep(pipe.unet, pipe.scheduler.config, args.sweep_out)
    matched_error_timing(pipe.unet, pipe.scheduler.config)
    multistep(pipe.unet, pipe.scheduler.config)
    guided()
    targets(pipe.unet, pipe.scheduler.config)


if __name__ == "__main__":
    main()
