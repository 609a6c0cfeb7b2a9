"""The shipped guided digits model: diffusers' own `DiTPipeline` loads it offline and draws the digits asked for
under classifier-free guidance; its trainer runs on tiny models; `train-guided-digits` checks its arguments first."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from pcr_diffusers import cli
from pcr_diffusers.cli import main
from pcr_diffusers.digits import load_digits_data
from pcr_diffusers.digits_guided import (
    GUIDED_DIGITS_DIR,
    NULL_LABEL,
    guided_digit_quality,
    load_guided_digits_pipeline,
    train_guided_digits,
)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_is_a_plain_dit_pipeline_of_a_few_mb():
    ddim, ddpm = load_guided_digits_pipeline(), load_guided_digits_pipeline("ddpm")
    assert type(ddim) is DiTPipeline and type(ddim.scheduler) is DDIMScheduler
    assert type(ddpm.scheduler) is DDPMScheduler and ddpm.transformer.config == ddim.transformer.config
    config = ddim.transformer.config
    assert config.num_embeds_ada_norm == NULL_LABEL == 1000  # DiTPipeline's null label
    assert config.out_channels == config.in_channels == ddim.vae.config.latent_channels  # no learned variance
    assert ddim.get_label_ids(["three", "7"]) == [3, 7]
    on_disk = sum(path.stat().st_size for path in GUIDED_DIGITS_DIR.rglob("*") if path.is_file())
    assert 1_000_000 < on_disk < 5_000_000
    with pytest.raises(ValueError, match="`scheduler` must be one of"):
        load_guided_digits_pipeline("euler")
    with pytest.raises(FileNotFoundError, match="train-guided-digits"):
        load_guided_digits_pipeline(path=GUIDED_DIGITS_DIR / "missing")


def test_guided_samples_are_the_digits_asked_for():
    pipe = quiet(load_guided_digits_pipeline())
    guided = guided_digit_quality(pipe, per_digit=5, num_inference_steps=20)  # guidance scale 4
    assert guided["label_accuracy"] >= 0.9 and guided["mean_confidence"] >= 0.9
    assert guided["digit_counts"] == [5] * 10
    # the conditional model alone (one pass, no null label) is less sure of its digits than the guided one
    unguided = guided_digit_quality(pipe, per_digit=5, num_inference_steps=20, guidance_scale=1.0)
    assert unguided["mean_confidence"] < guided["mean_confidence"] - 0.1


def tiny_transformer(**overrides) -> DiTTransformer2DModel:
    config = dict(
        num_attention_heads=1,
        attention_head_dim=8,
        in_channels=2,
        out_channels=2,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NULL_LABEL,
    )
    return DiTTransformer2DModel(**{**config, **overrides})


def tiny_vae(**overrides) -> AutoencoderKL:
    config = dict(in_channels=1, out_channels=1, block_out_channels=(4,), latent_channels=2, norm_num_groups=2)
    return AutoencoderKL(**{**config, **overrides})


def test_trainer_saves_a_pipeline_that_loads_and_samples(tmp_path):
    torch.manual_seed(0)
    transformer = tiny_transformer()
    initial = [p.detach().clone() for p in transformer.parameters()]
    train_guided_digits(tmp_path, steps=10, vae_steps=10, batch_size=8, transformer=transformer, vae=tiny_vae())
    pipe = quiet(load_guided_digits_pipeline(path=tmp_path))
    assert any(not torch.equal(p, q) for p, q in zip(pipe.transformer.parameters(), initial, strict=True))
    with torch.no_grad():
        latents = pipe.vae.encode(load_digits_data()[0]).latent_dist.sample()
    assert pipe.vae.config.scaling_factor * latents.std().item() == pytest.approx(1, rel=0.05)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=9), "`steps` must be an int of at least 10"),
        (dict(vae_steps=True), "`vae_steps` must be an int of at least 10"),
        (dict(label_dropout=1.0), "`label_dropout` must be in [0, 1)"),
        (dict(transformer=tiny_transformer(num_embeds_ada_norm=10)), "num_embeds_ada_norm=1000"),
        (dict(transformer=tiny_transformer(in_channels=4)), "`transformer` must take the VAE's latents, (2, 8, 8)"),
        (
            dict(transformer=tiny_transformer(out_channels=None)),
            "out_channels=2 (its in_channels), got out_channels=None",
        ),
        (dict(transformer=tiny_transformer(out_channels=4)), "out_channels=2 (its in_channels), got out_channels=4"),
        (dict(vae=tiny_vae(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2)), "one level"),
        (dict(vae=tiny_vae(in_channels=3)), "`vae` must take (1, 8, 8) images at one level (no downsampling)"),
    ],
)
def test_trainer_refuses_bad_arguments_before_training(kwargs, message, tmp_path):
    kwargs = {"transformer": tiny_transformer(), "vae": tiny_vae(), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        train_guided_digits(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def fail(*args, **kwargs):
    pytest.fail("work started before the arguments were checked")  # a BaseException: main does not catch it


USAGE_ERRORS = {
    "steps 9": (["--steps", "9"], "argument --steps: must be an integer of at least 10, got 9"),
    "steps not int": (["--steps", "1e3"], "argument --steps: expected an integer, got '1e3'"),
    "vae-steps 0": (["--vae-steps", "0"], "argument --vae-steps: must be an integer of at least 10, got 0"),
    "seed -1": (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got -1"),
    "out a file": (["--out", "{tmp}/file"], "argument --out: {tmp}/file is a file, not a folder"),
    "out not empty": (["--out", "{tmp}"], "argument --out: {tmp} already exists and is not empty"),
    "out missing": ([], "the following arguments are required: --out"),
}


@pytest.mark.parametrize("argv, message", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_cli_usage_errors_come_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "train_guided_digits", fail)
    (tmp_path / "file").write_text("not a folder")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    argv = argv if "--out" in argv or "required" in message else [*argv, "--out", str(tmp_path / "model")]
    with pytest.raises(SystemExit) as exit_info:
        main(["train-guided-digits", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("pcr-diffusers train-guided-digits: error: ") and message.format(tmp=tmp_path) in line
    assert [path.name for path in tmp_path.iterdir()] == ["file"]


def test_cli_trains_into_the_whole_folder_and_reports_accuracy(tmp_path, capsys, monkeypatch):
    calls = []

    def train_guided_digits(out_dir, steps, vae_steps, seed):
        calls.append((steps, vae_steps, seed))
        out_dir.mkdir(parents=True)
        (out_dir / "model_index.json").write_text("{}")
        return DiTPipeline(tiny_transformer(), tiny_vae(), DDIMScheduler())

    monkeypatch.setattr(cli, "train_guided_digits", train_guided_digits)
    monkeypatch.setattr(cli, "guided_digit_quality", lambda pipe: {"label_accuracy": 0.93, "digit_counts": [10] * 10})
    out = tmp_path / "new" / "model"
    assert main(["train-guided-digits", "--out", str(out), "--steps", "10", "--vae-steps", "12", "--seed", "3"]) == 0
    assert calls == [(10, 12, 3)] and (out / "model_index.json").is_file()
    assert not [path for path in tmp_path.rglob("*") if "partial" in path.name]
    assert "93% of 100 samples" in capsys.readouterr().out
