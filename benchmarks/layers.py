"""Speed-up of `PCRSequential` over `nn.Sequential` for deep MLPs and ResNets, forward and forward+backward.

    python benchmarks/layers.py [--device cuda] [--threads N] [--plot layers.png]     # tanh MLPs, exact Jacobians
    python benchmarks/layers.py --quick --plot layers_quick.png                        # a smoke test, seconds
    python benchmarks/layers.py --L 4096 --d 4 8 --batch 1                             # some cells of the grid
    python benchmarks/layers.py --resnets [--quick] [--plot resnets.png]               # ResNets, every Jacobian

Each cell is the wall-clock ratio `nn.Sequential / PCRSequential` (above 1: PCR is faster) on the same L layers,
float32, both measured side by side in one run; the tables also give Newton's iterations and the largest
difference of the outputs. `--plot` writes a PNG: for the tanh MLPs a heat map over (L, d), for `--resnets` the
speed-up against L for every Jacobian, one panel per block configuration, with the cost model's prediction.

Cost model (forward). The loop costs `L t_layer`. A Newton iteration costs `t_iter = t_jac + 2 t_pcr`: the
Jacobian's evaluation of all L blocks in one batched call (for `"identity"` the blocks alone; `"exact"` and
`"diagonal"` add D vector-Jacobian products, Hutchinson k) and the two PCR solves `newton_solve` does, each
`ceil(log2 L)` levels of `O(L batch D)` elementwise work (`O(L batch D^3)` dense, for `"exact"`). With K iterations
PCR's forward wins iff `K t_iter < L t_layer`: the `--resnets` table measures `t_iter / (L t_layer)` (column
`iter/loop`) so the crossover reads `K * iter/loop < 1`, and its `model` column is the predicted ratio
`1 / (K * iter/loop)` beside the measured one. On a device whose throughput is already used by one block
(a few CPU cores, conv blocks) a batched call of L blocks costs about L blocks, `iter/loop >= 1`, and PCR cannot
win at any L; where one block leaves the device mostly idle (a GPU, small blocks) the batched call costs about
one block, and PCR wins from the L where `L t_layer` outgrows `K (t_jac + 2 t_pcr)`.
"""

import argparse
import math
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from common import device_name, print_table, seconds
from matplotlib.colors import LogNorm
from torch import nn

from pcr_diffusers import pcr_solve
from pcr_diffusers.nn import LayerStack, PCRSequential, Residual, SampleDiagonalJacobian
from pcr_diffusers.nn.jacobians import resolve_jacobian

GRID = {"L": [64, 256, 1024, 4096], "d": [4, 8, 16, 32, 64], "batch": [1, 16]}
QUICK_GRID = {"L": [64, 256], "d": [4, 16], "batch": [1, 16]}
# (kind, channels or width, image side): conv ResNets on (batch, C, H, H) and wide residual MLPs on (batch, d)
RESNETS = [("conv", 4, 8), ("conv", 16, 8), ("conv", 16, 16), ("mlp", 64, 0), ("mlp", 256, 0)]
RESNET_DEPTHS = [64, 256, 1024]
QUICK_RESNETS, QUICK_RESNET_DEPTHS = [("conv", 4, 8), ("mlp", 64, 0)], [64]
JACOBIAN_CHOICES = ["exact", "diagonal", "hutchinson-4", "identity"]
# "exact" and "diagonal" cost D vector-Jacobian products of every block per Newton iteration ("exact" also a dense
# D^3 PCR): beyond this many entries per sample a cell would take minutes to lose by orders of magnitude.
VJP_JACOBIAN_MAX_SIZE = 64


class ConvBlock(nn.Module):
    """A pre-norm conv residual block `x + s conv3x3(silu(GroupNorm(x)))` on `(batch, C, H, W)`."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.norm = nn.GroupNorm(min(4, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.conv(nn.functional.silu(self.norm(x)))


def mlp_layers(L: int, d: int, device: str) -> list[nn.Module]:
    return [nn.Sequential(nn.Linear(d, d), nn.Tanh()).to(device) for _ in range(L)]


def cost_model(L: int, d: int, iters: int) -> tuple[float, float]:
    """The loop's sequential levels over PCR's, and PCR's flops over the loop's (both per sample).

    The loop: L levels, `2 d^2` flops each. A Newton iteration: the batched layer call and the Jacobians (`d` VJPs,
    `2 L d^3`), then `ceil(log2 L)` PCR levels of `2 L d^3` each: `iters (2 + ceil(log2 L))` levels in all and
    `iters d (1 + ceil(log2 L))` times the loop's flops.
    """
    log_L = math.ceil(math.log2(L)) if L > 1 else 0
    return L / (iters * (2 + log_L)), iters * d * (1 + log_L)


def timed(fn, repeats: int, device: str) -> float:
    """One run, timed; if it took under 2 s, `seconds` (warm-up, then the best of `repeats`) instead.

    A run of seconds (the large-d PCR cells) is timed once: its warm-up share is negligible, and repeating it would
    take the full grid from minutes to an hour.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    return once if once > 2.0 else seconds(fn, repeats, device)


def warm_up(device: str) -> None:
    """One tiny forward and backward through every Jacobian choice: the first `torch.func` call of a process pays a
    one-time initialisation (seconds on a CPU) that `timed` would otherwise charge to the first cell it measures."""
    blocks, sample = resnet_blocks("conv", 2, 2, 3, device)
    x = torch.randn(2, *sample, device=device, requires_grad=True)
    for name in JACOBIAN_CHOICES:
        PCRSequential(*blocks, jacobian=jacobian_for(name))(x).sum().backward()


def measure(L: int, d: int, batch: int, repeats: int, device: str) -> dict:
    """Forward and forward+backward seconds of both stacks over the same layers, timed one after the other."""
    torch.manual_seed(0)
    layers = mlp_layers(L, d, device)
    loop, pcr = nn.Sequential(*layers), PCRSequential(*layers, jacobian="exact")
    x = torch.randn(batch, d, device=device)
    x_grad = x.clone().requires_grad_()
    outputs = {}

    def forward(model):
        with torch.no_grad():
            outputs[model] = model(x)

    def forward_backward(model):
        model(x_grad).square().sum().backward()

    out = {"loop_fwd": timed(lambda: forward(loop), repeats, device)}
    out["pcr_fwd"] = timed(lambda: forward(pcr), repeats, device)
    out["diff"] = (outputs[loop] - outputs[pcr]).abs().max().item()
    out["iters"], out["converged"] = pcr.last_result.num_iters, pcr.last_result.converged
    out["loop_fb"] = timed(lambda: forward_backward(loop), repeats, device)
    out["pcr_fb"] = timed(lambda: forward_backward(pcr), repeats, device)
    return out


def resnet_blocks(kind: str, width: int, side: int, L: int, device: str) -> tuple[list[nn.Module], tuple]:
    """L residual blocks (scale `1/sqrt(L)`) and the shape of one sample."""
    torch.manual_seed(0)
    if kind == "conv":
        return [ConvBlock(width, L**-0.5).to(device) for _ in range(L)], (width, side, side)
    mlp = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(L)]
    return [Residual(block, scale=L**-0.5).to(device) for block in mlp], (width,)


def jacobian_for(name: str):
    """The `jacobian` argument of `PCRSequential` for a column of the table."""
    return SampleDiagonalJacobian(probes=4) if name == "hutchinson-4" else name


def iteration_seconds(blocks: list[nn.Module], x: torch.Tensor, name: str, repeats: int, device: str) -> float:
    """`t_jac + 2 t_pcr`: one Newton iteration's batched Jacobian evaluation of all L blocks and its two PCR solves,
    timed apart from the solver's bookkeeping, at the input `x` `(batch, *sample)` repeated over the L states."""
    stack = LayerStack(blocks)
    params, buffers = stack.parameters(), stack.buffers()
    L, batch = len(blocks), len(x)
    x_prev = x.reshape(1, batch, -1).expand(L, -1, -1).contiguous()  # (L, batch, D)
    ls = torch.arange(L, device=device)

    def step(ls, h):  # as PCRSequential's: layers `ls` on their inputs `h` (n, batch, D)
        layer_params = {key: p[ls] for key, p in params.items()}
        layer_buffers = {key: b[ls] for key, b in buffers.items()}
        return stack.evaluate(layer_params, layer_buffers, h.reshape(len(ls), *x.shape)).reshape(h.shape)

    _, jacobian = resolve_jacobian(jacobian_for(name), x_prev.shape[-1], residual=True)
    jacobian.reset(L, x_prev[0])
    with torch.no_grad():
        t_jac = seconds(lambda: jacobian.evaluate(step, ls, x_prev), repeats, device)
        _, A = jacobian.evaluate(step, ls, x_prev)

        def solve():
            return pcr_solve(A, x_prev, x_prev[0], structure=jacobian.structure, check_finite=False)

        t_pcr = seconds(solve, repeats, device)
    return t_jac + 2 * t_pcr


def measure_resnet(kind, width, side, L, batch, repeats, device) -> list[dict]:
    """The loop once, then PCR under every Jacobian choice, over the same blocks and input, in this run."""
    blocks, sample = resnet_blocks(kind, width, side, L, device)
    size = math.prod(sample)
    x = torch.randn(batch, *sample, device=device)
    x_grad = x.clone().requires_grad_()
    outputs = {}

    def forward(model, key):
        with torch.no_grad():
            outputs[key] = model(x)

    def forward_backward(model):
        model(x_grad).square().sum().backward()

    loop = nn.Sequential(*blocks)
    loop_fwd = timed(lambda: forward(loop, "loop"), repeats, device)
    loop_fb = timed(lambda: forward_backward(loop), repeats, device)
    rows = []
    for name in JACOBIAN_CHOICES:
        row = {"model": f"{kind} {'x'.join(map(str, sample))}", "D": size, "L": L, "batch": batch, "jacobian": name}
        row.update(loop_fwd=loop_fwd, loop_fb=loop_fb)
        if name in ("exact", "diagonal") and size > VJP_JACOBIAN_MAX_SIZE:
            rows.append(row | {"skipped": f"D={size} VJPs per iteration"})
            continue
        pcr = PCRSequential(*blocks, jacobian=jacobian_for(name))
        row["pcr_fwd"] = timed(lambda: forward(pcr, name), repeats, device)  # noqa: B023 (called right here)
        row["diff"] = (outputs["loop"] - outputs[name]).abs().max().item()
        row["iters"] = pcr.last_result.num_iters
        row["iter_over_loop"] = iteration_seconds(blocks, x, name, repeats, device) / loop_fwd
        row["pcr_fb"] = timed(lambda: forward_backward(pcr), repeats, device)  # noqa: B023
        row["adjoint_iters"] = "dense" if name == "exact" else pcr.last_adjoint_result.num_iters
        rows.append(row)
    return rows


def resnet_table(args, machine: str) -> None:
    """Conv ResNets and wide residual MLPs under each Jacobian: a table, a summary and, with `--plot`, a figure."""
    cases, depths = (QUICK_RESNETS, QUICK_RESNET_DEPTHS) if args.quick else (RESNETS, RESNET_DEPTHS)
    depths = args.L or depths
    batch = (args.batch or [1])[0]
    repeats = 1 if args.quick else args.repeats
    print(f"nn.Sequential / PCRSequential wall-clock, residual blocks (scale 1/sqrt(L)), float32, batch {batch}, on")
    print(f"{machine}")
    rows = []
    for kind, width, side in cases:
        for L in depths:
            for row in measure_resnet(kind, width, side, L, batch, repeats, args.device):
                rows.append(row)
                print(row, file=sys.stderr)  # progress: the full table takes minutes
    header = ["model", "D", "L", "jacobian", "iters fwd/adj", "max |diff|", "loop fwd", "PCR fwd", "fwd ratio"]
    header += ["iter/loop", "model", "loop f+b", "PCR f+b", "f+b ratio"]
    table = []
    for r in rows:
        line = [r["model"], r["D"], r["L"], r["jacobian"]]
        if "skipped" in r:
            table.append(line + ["skipped", r["skipped"]] + [""] * 8)
            continue
        line += [f"{r['iters']}/{r['adjoint_iters']}", f"{r['diff']:.1e}"]
        line += [f"{1e3 * r['loop_fwd']:.1f}ms", f"{1e3 * r['pcr_fwd']:.1f}ms", f"{r['loop_fwd'] / r['pcr_fwd']:.2f}x"]
        line += [f"{r['iter_over_loop']:.3f}", f"{1 / (r['iters'] * r['iter_over_loop']):.2f}x"]
        line += [f"{1e3 * r['loop_fb']:.1f}ms", f"{1e3 * r['pcr_fb']:.1f}ms", f"{r['loop_fb'] / r['pcr_fb']:.2f}x"]
        table.append(line)
    print_table(header, table)
    measured = [r for r in rows if "skipped" not in r]
    for key, name in [("fwd", "forward"), ("fb", "forward+backward")]:
        ratios = [(r[f"loop_{key}"] / r[f"pcr_{key}"], r) for r in measured]
        wins = [f"{r['model']} L={r['L']} {r['jacobian']} ({q:.2f}x)" for q, r in ratios if q >= 1]
        print(f"{name}: PCR faster in {len(wins)} of {len(ratios)} cells" + (": " + "; ".join(wins) if wins else ""))
    print(
        "Cost model: PCR's forward wins iff K * iter/loop < 1 (K: Newton iterations; iter/loop: one iteration's "
        "batched Jacobian evaluation of all L blocks plus its two PCR solves, over the loop's whole pass); 'model' "
        "is the predicted ratio 1 / (K * iter/loop)."
    )
    if args.plot:
        resnet_plot(rows, f"residual blocks, float32, batch {batch}, {machine}", args.plot)
        print(f"wrote {args.plot}")


def resnet_plot(rows: list[dict], title: str, path: str) -> None:
    """One panel per block configuration: the speed-up against L for every Jacobian, forward (solid), forward and
    backward (dashed), and the cost model's forward prediction (crosses); the grey line is parity."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    columns = min(3, len(models))
    rows_of_panels = math.ceil(len(models) / columns)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(4.6 * columns, 3.8 * rows_of_panels), squeeze=False, layout="constrained"
    )
    colors = dict(zip(JACOBIAN_CHOICES, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, model in zip(axes.flat, models, strict=False):
        cells = [r for r in rows if r["model"] == model and "skipped" not in r]
        for name in JACOBIAN_CHOICES:
            cell = sorted((r for r in cells if r["jacobian"] == name), key=lambda r: r["L"])
            if not cell:
                continue
            Ls = [r["L"] for r in cell]
            ax.plot(Ls, [r["loop_fwd"] / r["pcr_fwd"] for r in cell], "o-", color=colors[name], label=f"{name} fwd")
            ax.plot(Ls, [r["loop_fb"] / r["pcr_fb"] for r in cell], "s--", color=colors[name], label=f"{name} f+b")
            ax.plot(Ls, [1 / (r["iters"] * r["iter_over_loop"]) for r in cell], "x", color=colors[name], ms=9)
        ax.axhline(1.0, color="grey", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="blocks L", ylabel="nn.Sequential time / PCRSequential time")
        ax.set_xticks(sorted({r["L"] for r in cells}), [str(L) for L in sorted({r["L"] for r in cells})])
        ax.set_title(f"{model} (D={cells[0]['D'] if cells else '?'})", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}; x: the cost model's forward prediction 1 / (K * iter/loop)", fontsize=10)
    fig.savefig(path, dpi=120)


def heat_map(results: dict, grid: dict, title: str, path: str) -> None:
    """Rows L, columns d; one panel per (pass, batch); colour the ratio on a log scale centred on 1."""
    ratios = [r[key] for r in results.values() for key in ("fwd", "fb")]
    span = max(max(ratios), 1 / min(ratios), 2.0)
    fig, axes = plt.subplots(
        2, len(grid["batch"]), figsize=(4.5 * len(grid["batch"]) + 1, 7.5), squeeze=False, layout="constrained"
    )
    for row, (key, name) in enumerate([("fwd", "forward"), ("fb", "forward + backward")]):
        for col, batch in enumerate(grid["batch"]):
            ax = axes[row, col]
            values = np.array([[results[L, d, batch][key] for d in grid["d"]] for L in grid["L"]])
            image = ax.imshow(values, cmap="RdBu", norm=LogNorm(1 / span, span), origin="lower", aspect="auto")
            for i in range(len(grid["L"])):
                for j in range(len(grid["d"])):
                    dark = abs(math.log(values[i, j])) > 0.6 * math.log(span)
                    color = "white" if dark else "black"
                    ax.text(j, i, f"{values[i, j]:.2g}x", ha="center", va="center", fontsize=9, color=color)
            ax.set_xticks(range(len(grid["d"])), grid["d"])
            ax.set_yticks(range(len(grid["L"])), grid["L"])
            ax.set(xlabel="width d", ylabel="layers L", title=f"{name}, batch {batch}")
    fig.colorbar(image, ax=axes, label="nn.Sequential time / PCRSequential time (blue: PCR faster)")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def summarise(results: dict) -> None:
    """Where PCR wins and loses, read off the measured ratios, with the cost model's account of the crossover."""
    for key, name in [("fwd", "forward"), ("fb", "forward+backward")]:
        wins = sorted((r[key], cell) for cell, r in results.items() if r[key] >= 1)
        best_ratio, best_cell = max((r[key], cell) for cell, r in results.items())
        worst_ratio, worst_cell = min((r[key], cell) for cell, r in results.items())
        fmt = "L={}, d={}, batch={}".format
        print(f"{name}: PCR faster in {len(wins)} of {len(results)} cells, >= 2x in {sum(w >= 2 for w, _ in wins)}")
        print(f"  best {best_ratio:.2f}x at {fmt(*best_cell)}; worst {worst_ratio:.3f}x at {fmt(*worst_cell)}")
    print(
        "Cost model: the loop runs L sequential levels of O(batch d^2) work; PCR runs iters * (2 + ceil(log2 L)) "
        "levels but does 'work PCR/loop' = iters * d * (1 + ceil(log2 L)) times the loop's flops. PCR wins where the "
        "loop is bound by its L levels (large L, small d and batch) and loses where the extra d log L work dominates "
        "(large d or batch, or small L)."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--quick", action="store_true", help=f"a small grid {QUICK_GRID}, one repeat: a smoke test")
    parser.add_argument("--plot", default=None, help="write the figure to this PNG path (default: no figure)")
    parser.add_argument("--resnets", action="store_true", help="conv ResNets and wide MLPs under every Jacobian")
    for axis in GRID:
        parser.add_argument(f"--{axis}", type=int, nargs="+", help=f"override the grid's {axis} values")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = device_name(args.device)
    warm_up(args.device)
    if args.resnets:
        resnet_table(args, machine)
        return
    grid, repeats = (QUICK_GRID, 1) if args.quick else (GRID, args.repeats)
    grid = {axis: getattr(args, axis) or values for axis, values in grid.items()}
    print(f"nn.Sequential / PCRSequential wall-clock, tanh MLP, float32, on {machine}")
    header = ["L", "d", "batch", "iters", "max |diff|", "levels loop/PCR", "work PCR/loop", "loop fwd", "PCR fwd"]
    header += ["fwd ratio"]
    header += ["loop f+b", "PCR f+b", "f+b ratio"]
    results, rows = {}, []
    start = time.perf_counter()
    for L in grid["L"]:
        for d in grid["d"]:
            for batch in grid["batch"]:
                m = measure(L, d, batch, repeats, args.device)
                r = results[L, d, batch] = {"fwd": m["loop_fwd"] / m["pcr_fwd"], "fb": m["loop_fb"] / m["pcr_fb"]}
                levels, work = cost_model(L, d, m["iters"])
                iters = f"{m['iters']}" + ("" if m["converged"] else " (unconverged)")
                row = [L, d, batch, iters, f"{m['diff']:.1e}", f"{levels:.0f}", f"{work:.0f}"]
                row += [f"{1e3 * m[k]:.1f}ms" for k in ("loop_fwd", "pcr_fwd")] + [f"{r['fwd']:.2f}x"]
                row += [f"{1e3 * m[k]:.1f}ms" for k in ("loop_fb", "pcr_fb")] + [f"{r['fb']:.2f}x"]
                rows.append(row)
                print(" ".join(map(str, row)), file=sys.stderr)  # progress: the full grid takes minutes
    print_table(header, rows)
    summarise(results)
    if args.plot:
        heat_map(results, grid, f"tanh MLP, float32, {machine}", args.plot)
        print(f"wrote {args.plot}")
    print(f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
