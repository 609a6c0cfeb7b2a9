"""What parallel sampling buys on a given device: per-round throughput against the window size, and end-to-end
speed-up over sequential sampling on the shipped digits model. Runs on CUDA when available (timed with
`torch.cuda.synchronize`), else on the CPU.

    python benchmarks/throughput.py                    # digits model, eager
    python benchmarks/throughput.py --compile          # also torch.compile'd (CUDA graphs on CUDA); keeps the faster
    python benchmarks/throughput.py --device cuda      # adds a full-size SD 1.5 UNet (random weights, float16)

Part 1, round throughput: one model call on `window x batch` rows, and one whole round of the solver (the call,
the Jacobian, the linear solves, the predictor and the round's one host read; `pcr_diffusers.sampling` on the
digits model). `steps/s` is how many denoising steps a round advances per second if every step of the window is
accepted, the upper bound on parallel speed-up (`x window 1` compares it with one step per call, the sequential
loop). Part 2: DDPM-1000 and DDIM-50 with the sequential diffusers pipeline and with ours (default window, and the
window `"auto"` picks, fixed before timing), side by side, fastest of `--repeats-end-to-end` runs, with the faster
model variant of part 1. A compiled model is warmed up 3 times (CUDA graphs record on the first calls); TF32 is
off, so the difference column measures the solver, not TF32's rounding.
"""

import argparse

import numpy as np
import torch
from common import device_name, one_round_seconds, print_table, seconds
from diffusers import DDIMPipeline, DDPMPipeline, UNet2DConditionModel

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline
from pcr_diffusers.sampling import DenoisingChain
from pcr_diffusers.schedulers import PCRScheduler

SD15_UNET_CONFIG = dict(  # stable-diffusion-v1-5's unet/config.json
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


def compiled(model, device):
    """`torch.compile` of the model; on CUDA with CUDA graphs (`reduce-overhead`), shapes marked dynamic elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, dynamic=True)


def round_throughput(title, variants, make_inputs, windows, device, repeats, round_time=None):
    """Times one call per window for each model variant (and, with `round_time(window)`, one whole round of the
    solver with the fastest variant); returns {window: fastest variant's name}."""
    rows, fastest, base = [], {}, {}
    for window in windows:
        inputs = make_inputs(window)
        times = {}
        for name, call in variants.items():
            warmup = 3 if name == "compiled" else 1
            try:
                times[name] = seconds(lambda call=call, inputs=inputs: call(*inputs), repeats, device, warmup)
            except torch.cuda.OutOfMemoryError:
                times[name] = float("inf")
        best = min(times, key=times.get)
        fastest[window] = best
        if times[best] == float("inf"):
            rows.append([window, "out of memory", "", "", ""])
            break
        base = base or {name: t for name, t in times.items()}
        speedups = "  ".join(f"{name} {window * base[name] / t:.1f}x" for name, t in times.items())
        whole = "" if round_time is None else f"{round_time(window, best) * 1e3:.1f}"
        rows.append(
            [
                window,
                "  ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items()),
                whole,
                f"{window / times[best]:.0f}",
                speedups,
                best,
            ]
        )
    print(f"\n{title}, on {device_name(device)}: one call on window x batch rows, and one whole round")
    header = ["window", "ms per call", "ms per round", "steps / s (call)", "steps / s x window 1", "faster"]
    print_table(header, rows)
    return fastest


def digits_throughput(unet, args):
    variants = {"eager": lambda x, t: unet(x, t).sample}
    if args.compile:
        fast = compiled(unet, args.device)
        variants["compiled"] = lambda x, t: fast(x, t).sample

    def make_inputs(window):
        n = window * args.batch
        return torch.randn(n, 1, 8, 8, device=args.device), torch.randint(0, 1000, (n,), device=args.device)

    digits = load_digits_pipeline()
    twin = PCRScheduler.from_scheduler(digits.scheduler)
    twin.set_timesteps(max(args.windows))
    shape = (args.batch, 1, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)
    noise = twin.draw_noise(shape, torch.Generator().manual_seed(1), args.device)

    def round_time(window, variant):
        model = fast if variant == "compiled" else unet
        chain = DenoisingChain(lambda x, t: model(x, t).sample, twin, noise, process_group=False)
        return one_round_seconds(chain, latents, window, args.repeats, args.device, 3 if variant == "compiled" else 1)

    title = f"digits UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters), batch {args.batch}"
    fastest = round_throughput(title, variants, make_inputs, args.windows, args.device, args.repeats, round_time)
    return fast if args.compile and fastest.get(64, "eager") == "compiled" else unet


def end_to_end(unet, args):
    digits = load_digits_pipeline()
    rows = []
    for name, sequential_class, pcr_class, steps in [
        ("DDPM-1000", DDPMPipeline, PCRDDPMPipeline, 1000),
        ("DDIM-50", DDIMPipeline, PCRDDIMPipeline, 50),
    ]:
        sequential = sequential_class(unet=unet, scheduler=digits.scheduler)
        pcr = pcr_class.from_pipe(sequential)
        for pipe in (sequential, pcr):
            pipe.set_progress_bar_config(disable=True)

        def run(pipe, steps=steps, **kwargs):
            generator = torch.Generator().manual_seed(0)
            return pipe(args.batch, generator, num_inference_steps=steps, output_type="np", **kwargs)

        ref = run(sequential).images
        t_seq = seconds(lambda pipe=sequential: run(pipe), args.repeats_end_to_end, args.device)
        rows.append([name, "sequential (diffusers)", steps, steps, f"{t_seq:.2f}", "1.0x", "0"])
        auto = run(pcr, parallel="auto").stats.window  # fixed before timing: "auto" probes on every call
        for label, kwargs in [("ours, default window", {}), ('ours, the window "auto" picks', {"parallel": auto})]:
            out = run(pcr, **kwargs)
            t = seconds(lambda pipe=pcr, kwargs=kwargs: run(pipe, **kwargs), args.repeats_end_to_end, args.device)
            label += f" ({out.stats.window})"
            error = np.abs(out.images - ref).max()
            rows.append(
                [
                    name,
                    label,
                    out.stats.rounds,
                    out.stats.model_evaluations,
                    f"{t:.2f}",
                    f"{t_seq / t:.1f}x",
                    f"{error:.1e}",
                ]
            )
    print(f"\nEnd to end on the digits model, batch {args.batch}, on {device_name(args.device)}")
    print_table(["sampler", "method", "rounds", "model evals", "seconds", "speed-up", "max |diff|"], rows)


def sd15_throughput(args):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(args.device, torch.float16).eval()
    variants = {"eager": lambda x, t, text: unet(x, t, encoder_hidden_states=text).sample}
    if args.compile:
        fast = compiled(unet, args.device)
        variants["compiled"] = lambda x, t, text: fast(x, t, encoder_hidden_states=text).sample

    def make_inputs(window):
        n = 2 * window  # classifier-free guidance, batch 1
        return (
            torch.randn(n, 4, 64, 64, device=args.device, dtype=torch.float16),
            torch.randint(0, 1000, (n,), device=args.device),
            torch.randn(n, 77, 768, device=args.device, dtype=torch.float16),
        )

    title = "SD 1.5 UNet (random weights, float16, 512x512, guidance: 2 rows per step)"
    round_throughput(title, variants, make_inputs, args.windows, args.device, args.repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-end-to-end", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--sd15", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--quick", action="store_true", help="windows up to 16, no end-to-end run")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.quick:
        args.windows = [w for w in args.windows if w <= 16]
    unet = load_digits_pipeline().unet.to(args.device)
    unet = digits_throughput(unet, args)
    if not args.quick:
        end_to_end(unet, args)
    if args.sd15 or (args.sd15 is None and torch.device(args.device).type == "cuda"):
        sd15_throughput(args)


if __name__ == "__main__":
    main()
