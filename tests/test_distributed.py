"""The window sharded across 2 processes (torch.distributed, gloo on CPU) gives the single-process images."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[1] / "demos" / "distributed_sampling.py"
ARGS = ["--scheduler", "ddim", "--steps", "21", "--num-images", "3", "--tolerance", "1e-5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_two_processes_give_the_single_process_images(tmp_path):
    one = run([sys.executable, str(DEMO), *ARGS, "--save-array", "one.npy", "--out", "one.png"], tmp_path)
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
    two = run([*launcher, str(DEMO), *ARGS, "--save-array", "two.npy", "--out", "two.png"], tmp_path)
    assert "1 process(es)" in one and "2 process(es)" in two
    # Each process evaluates half of every round's rows; batched float32 kernels may round differently.
    assert np.abs(np.load(tmp_path / "one.npy") - np.load(tmp_path / "two.npy")).max() <= 1e-5
