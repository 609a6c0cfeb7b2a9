"""Train a small conv ResNet on the 8x8 digits twice, its residual stack run by `PCRSequential` and by the loop.

    python demos/train_digits_resnet.py --out train_digits_resnet.png
    python demos/train_digits_resnet.py --blocks 64 --epochs 2 --jacobian identity --damping trust
    python demos/train_digits_resnet.py --blocks 4 --channels 2 --epochs 1 --max-steps 3 --out smoke.png  # smoke

The model: a stem `Conv2d(1, C, 3)` on `(B, 1, 8, 8)`, then L shape-preserving residual blocks
`x + s conv3x3(silu(GroupNorm(x)))` on `(B, C, 8, 8)` (`s = 1/sqrt(L)`), then GroupNorm, SiLU and a linear layer
from the `64 C` features to 10 logits. Both runs build it from one seed (the same weights), see the same mini-batches
and differ only in how the stack of L blocks is run: Newton + PCR over all blocks at once with an adjoint solved
the same way, or block by block. `PCRSequential` returns the loop's outputs and gradients up to its tolerance, so
the two loss curves agree step by step (the right panel); the left panel shows what each costs in wall-clock time
on this machine. Prints each run's time, test accuracy and Newton iterations, and the wall-clock ratio.
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from pcr_diffusers.digits import load_digits_data
from pcr_diffusers.nn import PCRSequential, Residual


def digits_resnet(
    blocks: int, channels: int, mode: str, seed: int, jacobian: str = "auto", damping: float | str = 0.0
) -> nn.Sequential:
    """`(B, 1, 8, 8)` -> stem -> `blocks` residual conv blocks (a `PCRSequential` in `mode`) -> 10 logits.

    The same weights for every `mode`: all modules are created from `seed` in one order.
    """
    torch.manual_seed(seed)
    groups = min(4, channels)
    body = [
        Residual(
            nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)),
            scale=blocks**-0.5,
        )
        for _ in range(blocks)
    ]
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),  # stem: (B, 1, 8, 8) -> (B, C, 8, 8)
        PCRSequential(*body, mode=mode, jacobian=jacobian, damping=damping),  # (B, C, 8, 8), shape preserving
        nn.GroupNorm(groups, channels),
        nn.SiLU(),
        nn.Flatten(),  # (B, 64 C)
        nn.Linear(64 * channels, 10),
    )


def split_digits(seed: int, test_fraction: float = 0.2):
    """The digits `(N, 1, 8, 8)` in [-1, 1] and their labels `(N,)`, split once into train and test sets."""
    images, labels = load_digits_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    n_test = int(test_fraction * len(labels))
    return (images[n_test:], labels[n_test:]), (images[:n_test], labels[:n_test])


def train(mode: str, args, train_set, test_set) -> dict:
    """One training run; returns the loss after every step with its wall-clock seconds, and the test accuracy.

    Only the training steps are timed (forward, backward, optimizer step), not the data shuffling or evaluation.
    """
    dtype = getattr(torch, args.dtype)
    model = digits_resnet(args.blocks, args.channels, mode, args.seed, args.jacobian, args.damping)
    model = model.to(args.device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = train_set[0].to(args.device, dtype), train_set[1].to(args.device)
    batches = torch.Generator().manual_seed(args.seed)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    history = {"seconds": [], "loss": [], "iters": [], "adjoint_iters": [], "converged": True}
    elapsed, step = 0.0, 0
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=batches)
        for start in range(0, len(order), args.batch_size):
            if step == args.max_steps:
                break
            index = order[start : start + args.batch_size].to(args.device)
            sync()
            tic = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sync()
            elapsed += time.perf_counter() - tic
            step += 1
            history["seconds"].append(elapsed)
            history["loss"].append(loss.item())
            stack = model[1]
            if mode == "pcr":
                history["iters"].append(stack.last_result.num_iters)
                history["converged"] &= stack.last_result.converged
                if stack.last_adjoint_result is not None:  # None for jacobian="exact": one dense PCR solve
                    history["adjoint_iters"].append(stack.last_adjoint_result.num_iters)
                    history["converged"] &= stack.last_adjoint_result.converged
    model.eval()
    x_test, y_test = test_set[0].to(args.device, dtype), test_set[1].to(args.device)
    with torch.no_grad():
        predictions = model(x_test).argmax(1)
    history["accuracy"] = 100 * (predictions == y_test).double().mean().item()
    return history


def damping_value(text: str) -> float | str:
    """`--damping`: a number, or a name such as `trust` (checked by `PCRSequential`)."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=32, help="residual conv blocks L in the parallel stack")
    parser.add_argument("--channels", type=int, default=4, help="channels C: D = 64 C entries per sample")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jacobian", default="auto", help="auto (Picard for these blocks), identity, diagonal, exact")
    parser.add_argument("--damping", type=damping_value, default=0.0, help="a fixed lambda >= 0, or trust")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--out", default="train_digits_resnet.png")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_set, test_set = split_digits(args.seed)

    # 1. Train the same model from the same seed, with the residual stack run by Newton + PCR and by the loop.
    runs = {mode: train(mode, args, train_set, test_set) for mode in ("pcr", "sequential")}

    # 2. Report: time, accuracy, Newton iterations, and how far apart the two loss curves are.
    for mode, run in runs.items():
        line = (
            f"{mode:10s} {len(run['loss'])} steps in {run['seconds'][-1]:.1f}s, test accuracy {run['accuracy']:.1f}%"
        )
        for key, name in (("iters", "forward"), ("adjoint_iters", "adjoint")):
            if run[key]:
                line += f", {name} Newton iterations mean {sum(run[key]) / len(run[key]):.1f} max {max(run[key])}"
        print(line)
    pcr, seq = runs["pcr"], runs["sequential"]
    if not pcr["converged"]:
        print("some PCR solves did not converge within max_iters and were finished sequentially (see the warning)")
    gap = max(abs(a - b) for a, b in zip(pcr["loss"], seq["loss"], strict=True))
    print(f"largest loss difference between the runs: {gap:.2e}")
    print(f"wall-clock ratio sequential / pcr: {seq['seconds'][-1] / pcr['seconds'][-1]:.2f}x (above 1: PCR faster)")

    # 3. Plot loss against wall-clock time and against the step.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for mode, style in [("sequential", "-"), ("pcr", "--")]:
        run = runs[mode]
        label = f"{'PCRSequential' if mode == 'pcr' else 'nn.Sequential'} ({run['accuracy']:.1f}% test)"
        axes[0].plot(run["seconds"], run["loss"], style, label=label)
        axes[1].plot(range(1, len(run["loss"]) + 1), run["loss"], style, label=label)
    axes[0].set(xlabel="wall-clock seconds (training steps only)", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss", yscale="log")
    for ax in axes:
        ax.legend()
    fig.suptitle(
        f"conv ResNet on digits: {args.blocks} blocks of {args.channels}x8x8, jacobian={args.jacobian}, "
        f"damping={args.damping}, {args.dtype} on {args.device} ({torch.get_num_threads()} threads)"
    )
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return runs


if __name__ == "__main__":
    main()
