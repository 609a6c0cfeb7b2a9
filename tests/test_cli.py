"""The `pcr-diffusers` command: every argument checked before any work, one-line errors with exit status 2 (usage),
1 (other errors) or 130 (Ctrl-C), tracebacks only with `--debug`, and no partial output."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pcr_diffusers import cli
from pcr_diffusers.cli import main
from pcr_diffusers.sampling import DEFAULT_TOLERANCE


def fail(*args, **kwargs):
    pytest.fail("work started before the arguments were checked")  # a BaseException: main does not catch it


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model or training fails the test: a usage error must come before either."""
    monkeypatch.setattr(cli, "build_pipeline", fail)
    monkeypatch.setattr(cli, "train_digits", fail)


class FakePipe:
    """Stands in for a PCR pipeline: records its calls and returns black images, or raises `error`."""

    def __init__(self, error=None):
        self.calls = []
        self.error = error

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        stats = SimpleNamespace(rounds=1, model_evaluations=kwargs["num_inference_steps"], converged=True)
        return SimpleNamespace(images=np.zeros((kwargs["batch_size"], 8, 8, 1)), stats=stats)


@pytest.fixture
def fake_pipe(monkeypatch):
    pipe = FakePipe()
    monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: pipe)
    return pipe


def usage_error(argv, capsys) -> str:
    """Runs `main(argv)`, expecting argparse's usage error: exit status 2, usage, one error line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pcr-diffusers") and "Traceback" not in err
    return err.strip().splitlines()[-1]


GENERATE_USAGE_ERRORS = {
    "steps 0": (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    "steps -1": (["--steps", "-1"], "argument --steps: must be a positive integer, got -1"),
    "steps not int": (["--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
    "steps above training": (["--steps", "1001"], "argument --steps: 1001 steps, but the model was trained with 1000"),
    "euler steps above training": (["--scheduler", "euler", "--steps", "1001"], "argument --steps: 1001 steps"),
    "num-images 0": (["--num-images", "0"], "argument --num-images: must be a positive integer, got 0"),
    "parallel 0": (["--parallel", "0"], "argument --parallel: must be a positive integer, got 0"),
    "parallel -4": (["--parallel", "-4"], "argument --parallel: must be a positive integer, got -4"),
    "scale 0": (["--scale", "0"], "argument --scale: must be a positive integer, got 0"),
    "seed -1": (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
    "seed 2**64": (["--seed", str(2**64)], "argument --seed: must be an integer in [0, 2**64)"),
    "tolerance 0": (["--tolerance", "0"], "argument --tolerance: must be a positive finite number, got '0'"),
    "tolerance negative": (["--tolerance=-1e-3"], "argument --tolerance: must be a positive finite number"),
    "tolerance nan": (["--tolerance", "nan"], "argument --tolerance: must be a positive finite number, got 'nan'"),
    "tolerance inf": (["--tolerance", "inf"], "argument --tolerance: must be a positive finite number, got 'inf'"),
    "tolerance not a number": (["--tolerance", "small"], "argument --tolerance: expected a number, got 'small'"),
    "jacobian unknown": (["--jacobian", "newton"], "argument --jacobian: invalid choice: 'newton'"),
    "eta with ddpm": (["--eta", "0.5"], "argument --eta: only the ddim scheduler has an eta, not ddpm"),
    "eta 0 with euler": (["--scheduler", "euler", "--eta", "0"], "argument --eta: only the ddim scheduler has an eta"),
    "eta above 1": (["--scheduler", "ddim", "--eta", "1.5"], "argument --eta: must be a number in [0, 1]"),
    "eta nan": (["--scheduler", "ddim", "--eta", "nan"], "argument --eta: must be a number in [0, 1]"),
    "sequential parallel": (["--sequential", "--parallel", "8"], "--sequential: not allowed with --parallel"),
    "sequential compare": (["--sequential", "--compare"], "argument --sequential: not allowed with --compare"),
    "sequential tolerance": (["--sequential", "--tolerance", "1e-3"], "not allowed with --tolerance"),
    "sequential jacobian": (["--sequential", "--jacobian", "identity"], "not allowed with --jacobian"),
    "model not a pipeline": (["--model", "{tmp}"], "argument --model: {tmp} is not a folder holding a saved pipeline"),
    "model missing": (["--model", "{tmp}/nowhere"], "argument --model: {tmp}/nowhere is not a folder holding"),
}


@pytest.mark.parametrize("argv, message", GENERATE_USAGE_ERRORS.values(), ids=GENERATE_USAGE_ERRORS.keys())
def test_generate_usage_errors_come_before_any_work(argv, message, tmp_path, capsys, no_work):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    line = usage_error(["generate", *argv, "--out", str(tmp_path / "grid.png")], capsys)
    assert line.startswith("pcr-diffusers generate: error: ") and message.format(tmp=tmp_path) in line
    assert not list(tmp_path.iterdir())


OUT_USAGE_ERRORS = {
    "missing folder": ("nowhere/grid.png", "argument --out: the folder {tmp}/nowhere does not exist"),
    "a folder": ("", "argument --out: {tmp} is a folder, not an image file"),
    "unknown suffix": ("grid.txt", "argument --out: PIL cannot write an RGB image as '.txt'; use e.g. .png"),
    "no suffix": ("grid", "argument --out: PIL cannot write an RGB image as 'a file without suffix'"),
    "no RGB in the format": ("grid.xbm", "argument --out: PIL cannot write an RGB image as '.xbm'"),
}


@pytest.mark.parametrize("out, message", OUT_USAGE_ERRORS.values(), ids=OUT_USAGE_ERRORS.keys())
def test_generate_out_is_checked_before_any_work(out, message, tmp_path, capsys, no_work):
    line = usage_error(["generate", "--out", str(tmp_path / out)], capsys)
    assert message.format(tmp=tmp_path) in line
    assert not list(tmp_path.iterdir())


def test_out_folder_must_be_writable(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # a read-only folder, even when run as root
    line = usage_error(["generate", "--out", str(tmp_path / "grid.png")], capsys)
    assert f"argument --out: the folder {tmp_path} is not writable" in line
    line = usage_error(["train-digits", "--out", str(tmp_path / "new" / "model")], capsys)
    assert f"argument --out: cannot create {tmp_path}/new/model: the folder {tmp_path} is not writable" in line


def test_generate_defaults_are_unchanged(fake_pipe, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--num-images", "4", "--out", str(out)]) == 0
    (call,) = fake_pipe.calls
    assert call["num_inference_steps"] == 1000 and call["batch_size"] == 4
    assert call["parallel"] == 16  # max(8, DEFAULT_PARALLEL // num_images)
    assert call["tolerance"] == DEFAULT_TOLERANCE and call["jacobian"] == "auto" and "eta" not in call
    assert "parallel (window 16, jacobian auto): 1000 ddpm steps" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 40, 2 * 40)  # 2 x 2 images, 8 x 8 enlarged 4 times in a 4 px frame


def test_generate_passes_what_was_given(fake_pipe, tmp_path, capsys):
    argv = ["generate", "--scheduler", "ddim", "--eta", "1", "--steps", "20", "--parallel", "5"]
    argv += ["--tolerance", "1e-4", "--jacobian", "identity", "--seed", str(2**64 - 1), "--compare"]
    assert main([*argv, "--out", str(tmp_path / "grid.png")]) == 0
    parallel, sequential = fake_pipe.calls
    assert parallel["eta"] == sequential["eta"] == 1.0 and parallel["num_inference_steps"] == 20
    assert parallel["tolerance"] == 1e-4 and parallel["jacobian"] == "identity"
    assert (parallel["parallel"], sequential["parallel"]) == (5, 1)
    assert "speed-up" in capsys.readouterr().out


def test_sequential_runs_once(fake_pipe, tmp_path):
    assert main(["generate", "--scheduler", "euler", "--sequential", "--out", str(tmp_path / "grid.png")]) == 0
    (call,) = fake_pipe.calls
    assert call["parallel"] == 1 and call["num_inference_steps"] == 50


@pytest.mark.parametrize("where", ["loading", "sampling"])
def test_ctrl_c_exits_130_without_traceback_or_output(where, monkeypatch, tmp_path, capsys):
    if where == "loading":
        monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: (_ for _ in ()).throw(KeyboardInterrupt))
    else:
        monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: FakePipe(KeyboardInterrupt()))
    assert main(["generate", "--out", str(tmp_path / "grid.png")]) == 130
    assert capsys.readouterr().err == "pcr-diffusers: interrupted\n"
    assert not list(tmp_path.iterdir())


def test_errors_print_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: FakePipe(RuntimeError("the model broke")))
    assert main(["generate", "--out", str(tmp_path / "grid.png")]) == 1
    assert capsys.readouterr().err == "pcr-diffusers: error: the model broke\n"
    assert not list(tmp_path.iterdir())


def test_an_error_without_message_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: FakePipe(MemoryError()))
    assert main(["generate", "--out", str(tmp_path / "grid.png")]) == 1
    assert capsys.readouterr().err == "pcr-diffusers: error: MemoryError\n"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_debug_shows_the_traceback(error, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "build_pipeline", lambda model, scheduler: FakePipe(error()))
    with pytest.raises(error):
        main(["--debug", "generate", "--out", str(tmp_path / "grid.png")])


def test_a_failed_write_leaves_no_partial_file(fake_pipe, monkeypatch, tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous grid")
    save = Image.Image.save

    def save_half(image, fp, *args, **kwargs):
        if not isinstance(fp, (str, os.PathLike)):
            return save(image, fp, *args, **kwargs)  # the format check writes to memory
        with open(fp, "wb") as file:
            file.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", save_half)
    assert main(["generate", "--out", str(out)]) == 1
    assert capsys.readouterr().err == "pcr-diffusers: error: No space left on device\n"
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"the previous grid"


def test_argparse_exits_still_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0 and "--eta" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


TRAIN_USAGE_ERRORS = {
    "steps 0": (["--steps", "0"], "argument --steps: must be an integer of at least 10, got 0"),
    "steps 9": (["--steps", "9"], "argument --steps: must be an integer of at least 10, got 9"),
    "steps -1": (["--steps", "-1"], "argument --steps: must be an integer of at least 10, got -1"),
    "seed -1": (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
    "out a file": (["--out", "{tmp}/file"], "argument --out: {tmp}/file is a file, not a folder"),
    "out under a file": (["--out", "{tmp}/file/model"], "argument --out: {tmp}/file is a file, not a folder"),
    "out not empty": (["--out", "{tmp}"], "argument --out: {tmp} already exists and is not empty"),
    "out missing": ([], "the following arguments are required: --out"),
}


@pytest.mark.parametrize("argv, message", TRAIN_USAGE_ERRORS.values(), ids=TRAIN_USAGE_ERRORS.keys())
def test_train_usage_errors_come_before_any_work(argv, message, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("not a folder")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    argv = argv if "--out" in argv or "required" in message else [*argv, "--out", str(tmp_path / "model")]
    line = usage_error(["train-digits", *argv], capsys)
    assert line.startswith("pcr-diffusers train-digits: error: ") and message.format(tmp=tmp_path) in line
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


def fake_train(calls, error=None):
    def train_digits(out_dir, steps, seed):
        calls.append((steps, seed))
        out_dir.mkdir(parents=True)
        (out_dir / "model_index.json").write_text("{}")
        if error is not None:
            raise error

    return train_digits


@pytest.mark.parametrize("out", ["model", "new/folders/model", "empty"])
def test_train_writes_the_whole_folder(out, monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "train_digits", fake_train(calls))
    (tmp_path / "empty").mkdir()
    assert main(["train-digits", "--out", str(tmp_path / out), "--steps", "10", "--seed", "3"]) == 0
    assert calls == [(10, 3)]
    assert (tmp_path / out / "model_index.json").is_file()
    assert not [path for path in tmp_path.rglob("*") if "partial" in path.name]
    assert "check-digits --model" in capsys.readouterr().out


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt(), 130), (OSError("No space left on device"), 1)])
def test_interrupted_training_writes_nothing(error, code, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "train_digits", fake_train([], error))
    assert main(["train-digits", "--out", str(tmp_path / "model")]) == code
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-images", "0"], "argument --num-images: must be a positive integer, got 0"),
        (["--seed", "-2"], "argument --seed: must be an integer in [0, 2**64), got -2"),
        (["--model", "nowhere"], "argument --model: nowhere is not a folder holding a saved pipeline"),
    ],
)
def test_check_digits_usage_errors(argv, message, capsys, no_work):
    assert message in usage_error(["check-digits", *argv], capsys)


def test_generate_end_to_end(tmp_path, capsys):
    """The shipped model, a few DDIM steps: a PNG grid that PIL opens, and nothing else written."""
    out = tmp_path / "x.png"
    assert main(["generate", "--scheduler", "ddim", "--steps", "4", "--num-images", "1", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (40, 40)
    assert list(tmp_path.iterdir()) == [out]
