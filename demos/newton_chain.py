"""Newton + PCR on two chains of random layers: residual per iteration for each Jacobian approximation.

python demos/newton_chain.py --out newton_chain.png
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from pcr_diffusers import newton_solve


def chain(L, d, gain, residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(L, d, d, generator=gen, dtype=torch.float64) * gain / d**0.5
    c = torch.randn(L, d, generator=gen, dtype=torch.float64) * 0.5

    def step(ls, x):
        out = torch.tanh((W[ls] @ x.unsqueeze(-1)).squeeze(-1) + c[ls])
        return x + 0.05 * out if residual else out

    return step, torch.randn(d, generator=gen, dtype=torch.float64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--out", default="newton_chain.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, gain, residual) in zip(
        axes, [("tanh MLP, gain 0.5", 0.5, False), ("residual MLP", 1.0, True)], strict=True
    ):
        step, x0 = chain(args.steps, args.dim, gain, residual)
        for jacobian in ["exact", "diagonal", "secant", "identity", "zero"]:
            out = newton_solve(step, x0, args.steps, jacobian=jacobian, tol=1e-12, max_iters=60)
            print(f"{title:20s} {jacobian:9s} converged={out.converged} iterations={out.num_iters}")
            ax.semilogy(range(1, out.num_iters + 1), out.residuals, marker=".", label=jacobian)
        ax.set(title=f"{title}, L={args.steps}", xlabel="Newton iteration", ylabel="max residual")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
