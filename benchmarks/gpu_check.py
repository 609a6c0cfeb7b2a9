"""The prepared GPU check: one script, one table, for a machine with a CUDA GPU (under 8 minutes on one H100).

    python benchmarks/gpu_check.py                 # on CUDA
    python benchmarks/gpu_check.py --dry           # the same code paths on the CPU with tiny sizes (CI runs this)
    python benchmarks/gpu_check.py --json out.json # also write the rows as JSON

Sections, each a few rows of the one table (`check`, `case`, `figure`, `ok`):

1. parity: our parallel result against diffusers' sequential pipeline on the device, for the shipped digits model
   in float32 / float16 / bfloat16 with a CPU and a CUDA generator, and tiny random Stable Diffusion components
   (DDPM, DDIM, Euler, Euler ancestral, SD3 flow matching) in float32 and float16. Figure: the largest difference
   of the images in [0, 1] pixels (and of our parallel result from our own sequential loop, which computes the
   steps in float32 as the parallel one does). ok: within one 8-bit gray level of our sequential loop, and of
   diffusers' in float32.
2. syncs: host synchronisations per parallel round, counted by CUDA itself (`torch.cuda.set_sync_debug_mode`;
   on the CPU, by `pcr_diffusers.diagnostics.HostTraffic`), DDPM-100 at window 16 on the digits model. ok: <= 2.
3. throughput: one model call and one whole round (model, Jacobian, solve, summary read) against the window for
   an SD 1.5-size UNet in float16 (random weights, 512x512, guidance: 2 rows per step); TF32 off.
4. end to end: rounds and wall-clock speed-up over diffusers' sequential pipeline on the shipped model, DDPM-1000
   and DDIM-50 at batch 1 and 16, fastest of 3 runs each: with `parallel="auto"` (its probe rounds included) and
   at the window it keeps.
5. layers: `PCRSequential` over `nn.Sequential`, forward and forward+backward, deep narrow MLPs.

Timings are side by side in one run; rounds and evaluations are exact. `--dry` shrinks every size so the script
finishes in about a minute on 2 CPU cores: its figures are not measurements of anything.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_name, one_round_seconds, print_table, seconds
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from torch import nn

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.diagnostics import HostTraffic, count_cuda_syncs
from pcr_diffusers.nn import PCRSequential
from pcr_diffusers.pipelines import (
    PCRDDIMPipeline,
    PCRDDPMPipeline,
    PCRStableDiffusion3Pipeline,
    PCRStableDiffusionPipeline,
)
from pcr_diffusers.sampling import DenoisingChain, denoise_parallel
from pcr_diffusers.schedulers import PCRScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_stable_diffusion_3_components, tiny_stable_diffusion_components  # noqa: E402

GRAY_LEVEL = 1 / 255
SD15_UNET = dict(  # stable-diffusion-v1-5's unet/config.json, spelled out: no hub here
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = dict(  # the dry run's stand-in, with the same block types
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)


class Report:
    """The rows of the one table."""

    def __init__(self):
        self.rows = []

    def add(self, check: str, case: str, figure: str, ok: bool | None = None):
        ok = None if ok is None else bool(ok)  # numpy's bool is not JSON
        self.rows.append({"check": check, "case": case, "figure": figure, "ok": ok})
        mark = "" if ok is None else ("ok" if ok else "FAIL")
        print(f"  {check:11s} {case:55s} {figure}  {mark}", flush=True)


def generator(kind: str, device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu" if kind == "cpu" else device).manual_seed(seed)


def images(pipe, **kwargs):
    return pipe(output_type="np", **kwargs).images


def parity(report: Report, device: torch.device, dry: bool):
    digits = load_digits_pipeline()
    steps = 10 if dry else 100
    dtypes = [torch.float32] if dry else [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        for kind in ("cpu", "device"):
            unet = digits.unet.to(device, dtype)
            parent = DDPMPipeline(unet, DDPMScheduler.from_config(digits.scheduler.config))
            ours = PCRDDPMPipeline.from_pipe(parent)
            for pipe in (parent, ours):
                pipe.set_progress_bar_config(disable=True)
            kwargs = dict(batch_size=4, num_inference_steps=steps)
            theirs = images(parent, generator=generator(kind, device), **kwargs)
            sequential = images(ours, generator=generator(kind, device), parallel=1, **kwargs)
            parallel = images(ours, generator=generator(kind, device), **kwargs)
            to_ours, to_theirs = np.abs(parallel - sequential).max(), np.abs(parallel - theirs).max()
            ok = to_ours <= GRAY_LEVEL and (dtype != torch.float32 or to_theirs <= GRAY_LEVEL)
            report.add(
                "parity",
                f"digits DDPM-{steps}, {str(dtype)[6:]}, {kind} generator",
                f"vs our loop {to_ours:.1e}, vs diffusers {to_theirs:.1e}, {ours.stats.rounds} rounds",
                ok,
            )
    directory = tempfile.mkdtemp()
    sd = (tiny_stable_diffusion_components, StableDiffusionPipeline, PCRStableDiffusionPipeline)
    sd3 = (tiny_stable_diffusion_3_components, StableDiffusion3Pipeline, PCRStableDiffusion3Pipeline)
    cases = [  # name, the tiny components' builder, parent, ours, scheduler (None: the components' own)
        ("SD, DDIM", *sd, None),
        (
            "SD, DPM++ 2M Karras",
            *sd,
            lambda config: DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
        ),
        ("SD3, flow matching", *sd3, None),
    ]
    if not dry:
        cases += [
            ("SD, DDPM", *sd, DDPMScheduler.from_config),
            ("SD, Euler", *sd, EulerDiscreteScheduler.from_config),
            ("SD, Euler a", *sd, EulerAncestralDiscreteScheduler.from_config),
            ("SD, PNDM (SD 1.5)", *sd, PNDMScheduler.from_config),
            ("SD, UniPC", *sd, UniPCMultistepScheduler.from_config),
        ]
    for dtype in [torch.float32] if dry else [torch.float32, torch.float16]:
        for name, components, parent_class, pcr_class, scheduler in cases:
            parts = components(directory, dtype)
            if scheduler is not None:
                parts["scheduler"] = scheduler(parts["scheduler"].config)
            parent = parent_class(**parts).to(device)
            ours = pcr_class.from_pipe(parent)
            for pipe in (parent, ours):
                pipe.set_progress_bar_config(disable=True)
            kwargs = dict(prompt=["a cat", "a dog"], num_inference_steps=10, guidance_scale=7.5)
            torch.manual_seed(0)
            theirs = images(parent, generator=generator("cpu", device), **kwargs)
            torch.manual_seed(0)
            sequential = images(ours, generator=generator("cpu", device), parallel=1, **kwargs)
            torch.manual_seed(0)
            parallel = images(ours, generator=generator("cpu", device), **kwargs)
            to_ours, to_theirs = np.abs(parallel - sequential).max(), np.abs(parallel - theirs).max()
            ok = to_ours <= GRAY_LEVEL and (dtype != torch.float32 or to_theirs <= GRAY_LEVEL)
            report.add(
                "parity",
                f"tiny {name}, {str(dtype)[6:]}, guidance, batch 2",
                f"vs our loop {to_ours:.1e}, vs diffusers {to_theirs:.1e}, {ours.stats.rounds} rounds",
                ok,
            )


def digits_chain(device: torch.device, steps: int, batch: int = 1):
    digits = load_digits_pipeline()
    unet = digits.unet.to(device)
    twin = PCRScheduler.from_scheduler(digits.scheduler)
    twin.set_timesteps(steps)
    shape = (batch, 1, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    noise = twin.draw_noise(shape, torch.Generator().manual_seed(1), device)
    return DenoisingChain(lambda x, t: unet(x, t).sample, twin, noise, process_group=False), latents


def syncs(report: Report, device: torch.device, dry: bool):
    """Host synchronisations per round: a whole run minus a run stopped after its first round, over the rounds."""
    steps = 30 if dry else 100
    chain, latents = digits_chain(device, steps)

    def counted(max_rounds=None):
        if device.type == "cuda":
            with torch.no_grad(), count_cuda_syncs() as counter:
                _, stats = denoise_parallel(chain, latents, parallel=16, max_rounds=max_rounds)
                torch.cuda.synchronize()
            return counter.syncs, stats
        with torch.no_grad(), HostTraffic() as counter:
            _, stats = denoise_parallel(chain, latents, parallel=16, max_rounds=max_rounds)
        return counter.reads, stats

    counted()  # warm-up: tables built and moved once per set_timesteps and device
    total, stats = counted()
    first, _ = counted(max_rounds=1)
    per_round = (total - first) / max(stats.rounds - 1, 1)
    how = "CUDA sync debug mode" if device.type == "cuda" else "HostTraffic (CPU)"
    report.add("syncs", f"digits DDPM-{steps}, window 16, {how}", f"{per_round:.2f} per round", per_round <= 2)


def throughput(report: Report, device: torch.device, dry: bool):
    torch.manual_seed(0)
    dtype = torch.float32 if dry else torch.float16
    config = TINY_UNET if dry else SD15_UNET
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    size, text = config["sample_size"], (77 if not dry else 4, config["cross_attention_dim"])
    embeddings = torch.randn(2, *text, device=device, dtype=dtype)  # negative and positive prompt

    def model(x, t):  # classifier-free guidance: two rows per step
        n = len(x)
        out = unet(x.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=embeddings.repeat_interleave(n, 0))
        uncond, cond = out.sample.chunk(2)
        return uncond + 7.5 * (cond - uncond)

    twin = PCRScheduler.from_scheduler(DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False))
    twin.set_timesteps(64)
    latents = torch.randn(1, 4, size, size, device=device, dtype=torch.float32)
    chain = DenoisingChain(model, twin, None, process_group=False, model_dtype=dtype)
    base = None
    for window in [1, 2, 4, 8] if dry else [1, 2, 4, 8, 16, 32]:
        x = torch.randn(window, 4, size, size, device=device, dtype=dtype)
        t = torch.full((window,), 500, device=device)
        with torch.no_grad():
            call = seconds(lambda x=x, t=t: model(x, t), 3, device)
            round_ = one_round_seconds(chain, latents, window, 3, device)
        base = base or round_
        report.add(
            "throughput",
            f"{'tiny UNet' if dry else 'SD 1.5 UNet fp16'}, window {window} ({2 * window} rows)",
            f"call {call * 1e3:.1f} ms, round {round_ * 1e3:.1f} ms, {window * base / round_:.1f}x steps/s",
        )


def end_to_end(report: Report, device: torch.device, dry: bool):
    digits = load_digits_pipeline()
    unet = digits.unet.to(device)
    for name, parent_class, pcr_class, steps in [
        ("DDPM", DDPMPipeline, PCRDDPMPipeline, 20 if dry else 1000),
        ("DDIM", DDIMPipeline, PCRDDIMPipeline, 10 if dry else 50),
    ]:
        for batch in (1,) if dry else (1, 16):
            parent = parent_class(unet=unet, scheduler=digits.scheduler)
            end_to_end_case(report, device, dry, f"{name}-{steps}", parent, pcr_class.from_pipe(parent), steps, batch)


def end_to_end_case(report: Report, device, dry: bool, name: str, parent, ours, steps: int, batch: int):
    for pipe in (parent, ours):
        pipe.set_progress_bar_config(disable=True)

    def run(pipe, **kwargs):
        return images(pipe, batch_size=batch, generator=generator("cpu", device), num_inference_steps=steps, **kwargs)

    reference = run(parent)
    run(ours, parallel="auto")
    window = ours.stats.window  # the window "auto" keeps, timed fixed too (auto's own time includes its probe)
    repeats = 1 if dry else 3
    t_sequential = seconds(lambda: run(parent), repeats, device)
    t_auto = seconds(lambda: run(ours, parallel="auto"), repeats, device)
    t_ours = seconds(lambda: run(ours, parallel=window), repeats, device)
    error = np.abs(run(ours, parallel=window) - reference).max()
    report.add(
        "end to end",
        f"digits {name}, batch {batch}, window {window} (auto)",
        f"{ours.stats.rounds} rounds, {t_sequential / t_ours:.1f}x at that window, {t_sequential / t_auto:.1f}x "
        f"with 'auto', diff {error:.1e}",
        error <= GRAY_LEVEL,
    )


def layers(report: Report, device: torch.device, dry: bool):
    for L, d, batch in [(64, 4, 1)] if dry else [(1024, 4, 1), (4096, 4, 1), (1024, 16, 1), (1024, 4, 16)]:
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(d, d), nn.Tanh()).to(device) for _ in range(L)]
        x = torch.randn(batch, d, device=device)
        forward, backward = (
            layer_speedup(nn.Sequential(*blocks), PCRSequential(*blocks), x, grad, device) for grad in (False, True)
        )
        report.add(
            "layers",
            f"tanh MLP L={L}, d={d}, batch {batch}",
            f"forward {forward:.1f}x, forward+backward {backward:.1f}x",
        )


def layer_speedup(loop: nn.Module, pcr: nn.Module, x: torch.Tensor, grad: bool, device) -> float:
    """`loop`'s seconds over `pcr`'s, forward (`grad=False`) or forward and backward."""

    def run(model):
        if grad:
            model(x.clone().requires_grad_()).square().sum().backward()
        else:
            with torch.no_grad():
                model(x)

    return seconds(lambda: run(loop), 3, device) / seconds(lambda: run(pcr), 3, device)


SECTIONS = {"parity": parity, "syncs": syncs, "throughput": throughput, "end to end": end_to_end, "layers": layers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes: the code paths, not the figures")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --dry for the CPU code paths")
    # TF32 rounds float32 matrix products to 10 mantissa bits: the parity figures would measure it, not us
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    report = Report()
    started = time.perf_counter()
    print(f"gpu_check on {device_name(device)}{' (dry run: tiny sizes, figures mean nothing)' if args.dry else ''}")
    for name in args.sections:
        section_start = time.perf_counter()
        SECTIONS[name](report, device, args.dry)
        print(f"  ({name}: {time.perf_counter() - section_start:.0f} s)", flush=True)
    print(f"\n{device_name(device)}, {time.perf_counter() - started:.0f} s in all")
    rows = [
        [r["check"], r["case"], r["figure"], "" if r["ok"] is None else ("ok" if r["ok"] else "FAIL")]
        for r in report.rows
    ]
    print_table(["check", "case", "figure", "ok"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(device), "rows": report.rows}, indent=1))
    return 0 if all(r["ok"] is not False for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
