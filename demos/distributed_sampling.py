"""Parallel sampling with every round's window sharded across processes (torch.distributed via accelerate).

    torchrun --nproc_per_node 2 demos/distributed_sampling.py --out digits_2proc.png          # CPU, gloo
    accelerate launch --num_processes 2 demos/distributed_sampling.py --out digits_2proc.png  # e.g. one GPU each

Every process builds the same pipeline and passes the same seed. The process group is initialised from the
launcher's environment (both launchers set WORLD_SIZE, RANK, LOCAL_RANK): nccl with a GPU per process when the machine
has one for each of its processes, else gloo on the CPU. The pipeline sees the group and splits each
round's batched model call across the processes, all-gathers the outputs and runs the (cheap) PCR solve on every
process, so all of them compute the same images. Rank 0 saves them. Run it without a launcher for one process.
"""

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.cli import save_grid
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--steps", type=int, default=None, help="default: 1000 for ddpm, 50 for ddim")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--parallel", default=None, help="the window, or 'auto'; default: the pipeline's")
    parser.add_argument("--out", default="digits_distributed.png")
    parser.add_argument("--save-array", default=None, help="also save the images as a .npy file (rank 0)")
    args = parser.parse_args()

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # a GPU per process (nccl) when this machine has one for each of its processes, else all on the CPU (gloo)
    on_gpu = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    pipeline_class = PCRDDIMPipeline if args.scheduler == "ddim" else PCRDDPMPipeline
    pipe = pipeline_class.from_pipe(load_digits_pipeline(args.scheduler)).to(device)
    kwargs = {} if args.tolerance is None else {"tolerance": args.tolerance}
    if args.parallel is not None:
        kwargs["parallel"] = args.parallel if args.parallel == "auto" else int(args.parallel)
    with torch.inference_mode():
        out = pipe(
            batch_size=args.num_images,
            generator=torch.Generator().manual_seed(args.seed),
            num_inference_steps=args.steps or (1000 if args.scheduler == "ddpm" else 50),
            output_type="np",
            **kwargs,
        )
    if rank == 0:
        print(
            f"{world_size} process(es): {out.stats.rounds} rounds, {out.stats.model_evaluations} model "
            f"evaluations, window {out.stats.window}, converged={out.stats.converged}"
        )
        save_grid(out.images, args.out, scale=4)
        if args.save_array:
            np.save(args.save_array, out.images)
        print(f"wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
