"""Train a deep residual MLP on scikit-learn's digits twice, with `PCRSequential` and with the plain loop.

    python demos/train_deep_mlp.py --out train_deep_mlp.png
    python demos/train_deep_mlp.py --blocks 16 --epochs 1 --max-steps 5 --out smoke.png   # a smoke run

Both runs start from the same weights and see the same mini-batches (one seed); only how the L residual blocks
`x + s W gelu(LN x)` are run differs: Newton + PCR forward and a PCR adjoint backward, or the layer-by-layer loop.
Since `PCRSequential` returns the loop's outputs and gradients up to its tolerance, the two loss curves agree step
by step; the plot shows what each costs in wall-clock time on this machine, and the final test accuracies are
printed (they agree within a point).
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


def deep_mlp(blocks: int, width: int, mode: str, seed: int, jacobian: str = "exact") -> nn.Sequential:
    """64 pixels -> width -> `blocks` pre-norm residual blocks -> 10 logits; the same weights for every `mode`."""
    torch.manual_seed(seed)
    body = [
        Residual(nn.Sequential(nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)), scale=1 / blocks**0.5)
        for _ in range(blocks)
    ]
    return nn.Sequential(
        nn.Linear(64, width),
        PCRSequential(*body, mode=mode, jacobian=jacobian),
        nn.LayerNorm(width),
        nn.Linear(width, 10),
    )


def split_digits(seed: int, test_fraction: float = 0.2):
    """Flattened digits `(N, 64)` in [-1, 1] and their labels, split once into train and test sets."""
    images, labels = load_digits_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images.flatten(1)[order], labels[order]
    n_test = int(test_fraction * len(labels))
    return (images[n_test:], labels[n_test:]), (images[:n_test], labels[:n_test])


def train(mode: str, args, train_set, test_set) -> dict:
    """One training run; returns the loss after every step with its wall-clock time, and the test accuracy."""
    model = deep_mlp(args.blocks, args.width, mode, args.seed, args.jacobian).to(
        args.device, getattr(torch, args.dtype)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x_train, y_train = (t.to(args.device) for t in train_set)
    x_train = x_train.to(getattr(torch, args.dtype))
    batches = torch.Generator().manual_seed(args.seed)
    history = {"seconds": [], "loss": [], "iters": []}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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
            if mode == "pcr":
                history["iters"].append(model[1].last_result.num_iters)
    x_test, y_test = (t.to(args.device) for t in test_set)
    with torch.no_grad():
        predictions = model(x_test.to(getattr(torch, args.dtype))).argmax(1)
    history["accuracy"] = 100 * (predictions == y_test).double().mean().item()
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=256, help="residual blocks L (the issue asks for >= 256)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jacobian", default="exact", help="the forward Newton's Jacobian, e.g. exact or identity")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--out", default="train_deep_mlp.png")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train_set, test_set = split_digits(args.seed)

    # 1. Train the same model from the same seed, with the blocks run by Newton + PCR and by the loop.
    runs = {mode: train(mode, args, train_set, test_set) for mode in ("pcr", "sequential")}

    # 2. Report: time, accuracy, Newton iterations, and how far apart the two loss curves are.
    for mode, run in runs.items():
        line = (
            f"{mode:10s} {len(run['loss'])} steps in {run['seconds'][-1]:.1f}s, test accuracy {run['accuracy']:.1f}%"
        )
        if run["iters"]:
            line += f", Newton iterations per forward: mean {sum(run['iters']) / len(run['iters']):.1f}"
            line += f", max {max(run['iters'])}"
        print(line)
    pcr, seq = runs["pcr"], runs["sequential"]
    gap = max(abs(a - b) for a, b in zip(pcr["loss"], seq["loss"], strict=True))
    agree = abs(pcr["accuracy"] - seq["accuracy"]) <= 1.0
    print(f"largest loss difference between the runs: {gap:.2e}")
    print(f"wall-clock ratio sequential / pcr: {seq['seconds'][-1] / pcr['seconds'][-1]:.2f}x")
    print(f"accuracies agree within 1 point: {agree}")

    # 3. Plot loss against wall-clock time and against the step.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for mode, style in [("sequential", "-"), ("pcr", "--")]:
        run = runs[mode]
        label = f"{'PCRSequential' if mode == 'pcr' else 'nn.Sequential loop'} ({run['accuracy']:.1f}% test)"
        axes[0].plot(run["seconds"], run["loss"], style, label=label)
        axes[1].plot(range(1, len(run["loss"]) + 1), run["loss"], style, label=label)
    axes[0].set(xlabel="wall-clock seconds (training steps only)", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss", yscale="log")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{args.blocks}-block residual MLP, width {args.width}, digits, {args.dtype} on {args.device}")
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
