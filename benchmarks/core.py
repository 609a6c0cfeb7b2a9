"""Wall-clock of `sequential_solve` against `pcr_solve`, measured side by side in one run.

python benchmarks/core.py [--device cuda] [--dtype float32]
"""

import argparse

import torch
from common import device_name, print_table, seconds

from pcr_diffusers import pcr_solve, sequential_solve

LENGTHS = [64, 256, 1024, 4096, 16384]
# (name, structure, shape of A per step, state shape)
CASES = [
    ("scalar", "elementwise", (), (64,)),
    ("diagonal", "elementwise", (64,), (64,)),
    ("dense d=4", "dense", (4, 4), (4,)),
    ("dense d=16", "dense", (16, 16), (16,)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"sequential_solve / pcr_solve wall-clock on {device_name(args.device)}, {args.dtype}")
    rows = []
    for name, structure, a_shape, state in CASES:
        row = [name]
        for L in LENGTHS:
            A = torch.rand(L, *a_shape, device=args.device, dtype=dtype) / (a_shape[-1] if structure == "dense" else 1)
            b = torch.randn(L, *state, device=args.device, dtype=dtype)
            x0 = torch.randn(state, device=args.device, dtype=dtype)
            inputs = (A, b, x0)
            t_seq = seconds(lambda i=inputs, s=structure: sequential_solve(*i, structure=s), args.repeats, args.device)
            t_pcr = seconds(lambda i=inputs, s=structure: pcr_solve(*i, structure=s), args.repeats, args.device)
            row.append(f"{t_seq / t_pcr:.1f}x")
        rows.append(row)
    print_table(["structure", *[f"L={L}" for L in LENGTHS]], rows)


if __name__ == "__main__":
    main()
