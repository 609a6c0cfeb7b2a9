"""A smoke run of `demos/train_digits_resnet.py` at a tiny size: it trains both ways, agrees, and writes its plot."""

import importlib.util
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "demos" / "train_digits_resnet.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread on a loaded machine (see tests/test_nn.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("train_digits_resnet", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_runs_see_the_same_losses_and_the_plot_is_written(demo, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "curves.png"
    argv = ["--blocks", "5", "--channels", "2", "--epochs", "1", "--max-steps", "3", "--dtype", "float64"]
    runs = demo.main([*argv, "--damping", "trust", "--out", str(out)])
    pcr, seq = runs["pcr"], runs["sequential"]
    assert len(pcr["loss"]) == len(seq["loss"]) == 3 and pcr["converged"]
    for a, b in zip(pcr["loss"], seq["loss"], strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)
    assert pcr["accuracy"] == seq["accuracy"]
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "wall-clock ratio sequential / pcr" in printed and "test accuracy" in printed
