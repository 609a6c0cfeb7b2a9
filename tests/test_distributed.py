"""Sampling sharded across processes (torch.distributed) gives the single-process result on every process.

Two launchers: the digits demo under torchrun, and tiny Stable Diffusion / SD3 text-to-image with classifier-free
guidance (tests/conftest.py's float64 components) under `torch.multiprocessing` (`launch`), over 2 and 3 processes
and windows that do not split evenly across them, so that some process has fewer steps of a round than the others,
or none. Each process uses nccl on a GPU of its own when there is one per process, else gloo on the CPU.
"""

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_stable_diffusion_3_components, tiny_stable_diffusion_components
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

from pcr_diffusers.pipelines import PCRStableDiffusion3Pipeline, PCRStableDiffusionPipeline
from pcr_diffusers.sampling import ShardedModel

DEMO = Path(__file__).resolve().parents[1] / "demos" / "distributed_sampling.py"
ARGS = ["--scheduler", "ddim", "--steps", "21", "--num-images", "3", "--tolerance", "1e-5"]
TIMEOUT = 240  # seconds for a whole launch; a process waiting on a collective fails after it too

STEPS = 10
TOLERANCE = 1e-6
PROMPTS = ["a cat", "a dog!"]
# case: (pipeline, arguments); all guided, so every model call takes whole steps of 2B rows
CASES = {
    "sd-batch-1-window-4": ("sd", dict(prompt="a cat", parallel=4)),
    "sd-batch-2-window-7": ("sd", dict(prompt=PROMPTS, parallel=7)),
    "sd3-stochastic-batch-2-window-4": ("sd3", dict(prompt=PROMPTS, negative_prompt=["dog", "cat"], parallel=4)),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_device(rank: int, world_size: int) -> torch.device:
    """GPU `rank` when every process has a GPU of its own (nccl), else the CPU (gloo)."""
    return torch.device("cuda", rank) if torch.cuda.device_count() >= world_size else torch.device("cpu")


def run(command, tmp_path, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_two_processes_give_the_single_process_images(tmp_path):
    # both runs on the same kind of device: the GPUs only when each of the two processes gets one
    env = {} if torch.cuda.device_count() >= 2 else {"CUDA_VISIBLE_DEVICES": ""}
    one = run([sys.executable, str(DEMO), *ARGS, "--save-array", "one.npy", "--out", "one.png"], tmp_path, env)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    two = run([*launcher, str(DEMO), *ARGS, "--save-array", "two.npy", "--out", "two.png"], tmp_path, env)
    assert "1 process(es)" in one and "2 process(es)" in two
    # Each process evaluates half of every round's rows; batched float32 kernels may round differently.
    assert np.abs(np.load(tmp_path / "one.npy") - np.load(tmp_path / "two.npy")).max() <= 1e-5
    # "auto" times rounds at growing windows: the processes agree on every window, or the solve would stop
    auto = [*launcher, str(DEMO), *ARGS, "--parallel", "auto", "--save-array", "auto.npy", "--out", "auto.png"]
    assert "2 process(es)" in run(auto, tmp_path, env)
    assert np.abs(np.load(tmp_path / "one.npy") - np.load(tmp_path / "auto.npy")).max() <= 1e-4


def pipeline(name: str, ours: bool, directory: Path, device) -> StableDiffusionPipeline:
    """Our pipeline or diffusers' on the tiny float64 components (their tokenizer files written to `directory`)."""
    directory.mkdir(parents=True, exist_ok=True)
    if name == "sd":
        components = tiny_stable_diffusion_components(directory, torch.float64)
        pipe = (PCRStableDiffusionPipeline if ours else StableDiffusionPipeline)(**components)
    else:
        components = tiny_stable_diffusion_3_components(directory, torch.float64)
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
        pipe = (PCRStableDiffusion3Pipeline if ours else StableDiffusion3Pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def seeded(kwargs, global_seed=0):
    """The case's arguments with a fresh generator; the global RNG seeded too, for SD3's stochastic steps."""
    torch.manual_seed(global_seed)
    return dict(
        kwargs,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )


def whole_steps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A model that, like `GuidedModel`, takes only whole steps of 3 rows."""
    assert len(x) % 3 == 0 and len(t) == len(x), len(x)
    return x * t[:, None] + 1


def step_inputs(num_steps: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `(num_steps * 3, 2)` and `t` `(num_steps * 3,)`, step-major, as `DenoisingChain` passes them."""
    x = torch.arange(num_steps * 6, dtype=torch.float64, device=device).reshape(-1, 2)
    return x, torch.arange(num_steps, device=device).repeat_interleave(3)


def record_rows(model: torch.nn.Module, rows: list):
    """Appends the rows (batch) of each call of `model` to `rows`; returns the hook's handle."""

    def record(module, args, kwargs):
        rows.append(len(args[0] if args else kwargs["hidden_states"]))

    return model.register_forward_pre_hook(record, with_kwargs=True)


def sample_sharded(rank: int, world_size: int, port: int, directory: Path) -> None:
    """One process: every case, sharded; saves each case's latents, stats and the rows of each model call."""
    torch.set_num_threads(1)
    device = process_device(rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=TIMEOUT),
    )
    try:
        results = {}
        sharded = ShardedModel(whole_steps, rows_per_step=3)
        results["steps"] = {n: sharded(*step_inputs(n, device)).cpu() for n in range(1, 2 * world_size + 2)}
        try:
            sharded(*(tensor[:4] for tensor in step_inputs(2, device)))
        except ValueError as error:
            results["part-of-a-step"] = str(error)
        pipes = {name: pipeline(name, True, directory / f"rank-{rank}-{name}", device) for name in ("sd", "sd3")}
        for case, (name, kwargs) in CASES.items():
            model = pipes[name].unet if name == "sd" else pipes[name].transformer
            rows = []
            hook = record_rows(model, rows)
            out = pipes[name](**seeded(kwargs), tolerance=TOLERANCE)
            hook.remove()
            results[case] = dict(latents=out.images.cpu(), converged=out.stats.converged, rows=rows)
        try:  # each process seeds the global RNG differently: the stochastic steps draw different noise
            pipes["sd3"](**seeded(CASES["sd3-stochastic-batch-2-window-4"][1], global_seed=rank), tolerance=TOLERANCE)
        except ValueError as error:
            results["different-seeds"] = str(error)
        torch.save(results, directory / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(worker, world_size: int, *args) -> None:
    """Runs `worker(rank, world_size, *args)` in `world_size` new processes; fails on an error or a hang.

    The processes are forked from a fork server that has imported diffusers, transformers and our pipelines once
    (10 to 20 s on a busy 2-core machine), instead of each importing them again as spawned processes would; like
    those, they inherit no threads and no CUDA state from pytest's process. (This module itself is not preloaded:
    Python 3.11's fork server does not get pytest's `sys.path`.)"""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    mp.set_forkserver_preload(["pcr_diffusers.pipelines", "transformers.models.clip.modeling_clip"])
    context = mp.start_processes(worker, (world_size, *args), nprocs=world_size, join=False, start_method=method)
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} processes did not finish in {TIMEOUT} s: a hang")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """`reference(case, device)`: the final latents of diffusers' sequential pipeline, in this (single) process."""

    @cache
    def latents(case: str, device: str) -> torch.Tensor:
        name, kwargs = CASES[case]
        pipe = pipeline(name, False, tmp_path_factory.mktemp(f"{name}-tokenizer"), device)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the tiny models gain nothing from more threads on a busy machine
        try:
            return pipe(**seeded({k: v for k, v in kwargs.items() if k != "parallel"})).images.cpu()
        finally:
            torch.set_num_threads(threads)

    return latents


@pytest.mark.parametrize("world_size", [2, 3])
def test_guided_text_to_image_matches_the_single_process_pipeline(tmp_path, reference, world_size):
    launch(sample_sharded, world_size, free_port(), tmp_path)
    results = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in range(world_size)]
    # `ShardedModel` alone, over fewer steps than processes up to more than two per process
    for result in results:
        for num_steps, out in result["steps"].items():
            torch.testing.assert_close(out, whole_steps(*step_inputs(num_steps)), rtol=0, atol=0)
        assert "whole steps of `rows_per_step`=3 rows" in result.get("part-of-a-step", "no error")
    device = str(process_device(0, world_size))
    for case, (_, kwargs) in CASES.items():
        ref = reference(case, device)
        latents = results[0][case]["latents"]
        assert results[0][case]["converged"], case
        # measured: 1e-8 of the latents' max for SD, 1e-7 for SD3 (its steps compute in float32)
        assert (latents - ref).abs().max() <= TOLERANCE * ref.abs().max(), case
        for rank, result in enumerate(results):
            # every process solves on the same all-gathered model outputs: the same latents, bit for bit
            torch.testing.assert_close(result[case]["latents"], latents, rtol=0, atol=0, msg=case)
            # each model call takes whole steps of 2B rows (guidance); in the first round, the process's share of
            # the window, or step 0 alone (to learn the output's shape) when it has none
            step_rows = 2 * len(ref)
            assert all(rows % step_rows == 0 for rows in result[case]["rows"]), (case, rank, result[case]["rows"])
            share = -(-kwargs["parallel"] // world_size)
            own = min(share, max(kwargs["parallel"] - rank * share, 0)) or 1  # none: step 0, to learn the shape
            assert result[case]["rows"][0] == own * step_rows, (case, rank, result[case]["rows"])
    # differently seeded processes fail, all of them and loudly, where the sharded call would mix their trajectories
    for result in results:
        assert "different inputs" in result.get("different-seeds", "no error"), result.get("different-seeds")
