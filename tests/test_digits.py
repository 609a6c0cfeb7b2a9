"""The shipped digits model: plain diffusers pipelines load it, our pipelines reproduce them seed for seed in
float32, its samples are recognisable, and the command line works."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler

from pcr_diffusers import load_digits_pipeline
from pcr_diffusers.cli import main
from pcr_diffusers.digits import digit_quality
from pcr_diffusers.pipelines import PCRDDIMPipeline, PCRDDPMPipeline


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_load_digits_pipeline_returns_plain_diffusers_pipelines():
    ddpm, ddim = load_digits_pipeline(), load_digits_pipeline("ddim")
    assert type(ddpm) is DDPMPipeline and type(ddim) is DDIMPipeline
    assert ddim.unet.config == ddpm.unet.config and ddim.scheduler.config.clip_sample
    assert sum(p.numel() for p in ddpm.unet.parameters()) > 500_000
    with pytest.raises(ValueError, match="scheduler"):
        load_digits_pipeline("pndm")


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_is_seed_exact_in_float32(eta):
    pipe = quiet(load_digits_pipeline("ddim"))
    ref = pipe(batch_size=2, generator=generators(1, 2), eta=eta, num_inference_steps=50, output_type="np").images
    pcr = quiet(PCRDDIMPipeline.from_pipe(pipe))
    out = pcr(
        batch_size=2, generator=generators(1, 2), eta=eta, num_inference_steps=50, output_type="np", tolerance=5e-5
    )
    assert out.stats.converged and out.stats.rounds < 50
    assert np.abs(out.images - ref).max() <= 1e-4


def test_ddpm_is_seed_exact_in_float32():
    pipe = quiet(load_digits_pipeline())
    ref = pipe(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=100, output_type="np"
    ).images
    out = quiet(PCRDDPMPipeline.from_pipe(pipe))(
        batch_size=2,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=100,
        output_type="np",
        tolerance=1e-4,
    )
    assert out.stats.converged and out.stats.rounds < 100
    assert np.abs(out.images - ref).max() <= 1e-4


def test_ddpm_1000_at_the_defaults_is_within_one_gray_level_in_few_rounds():
    pipe = quiet(load_digits_pipeline())
    ref = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    out = quiet(PCRDDPMPipeline.from_pipe(pipe))(
        batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out.stats.converged and out.stats.rounds <= 60
    assert np.abs(out.images - ref).max() <= 1 / 255


def test_samples_are_recognisable_digits():
    images = quiet(load_digits_pipeline("ddim"))(
        batch_size=100, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    quality = digit_quality(images * 2 - 1)
    assert quality["classifier_accuracy"] > 0.95
    assert quality["mean_confidence"] >= 0.85
    assert all(count > 0 for count in quality["digit_counts"])


def test_cli_generate_compare_and_check(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--scheduler",
                "ddim",
                "--steps",
                "10",
                "--num-images",
                "5",
                "--out",
                str(out),
                "--compare",
                "--scale",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "max |parallel - sequential|" in printed
    from PIL import Image

    assert Image.open(out).size == (3 * 20, 2 * 20)  # 5 images in a 3 x 2 grid, 8 x 8 enlarged twice, 2px frame
    assert main(["check-digits", "--num-images", "10"]) == 0
    assert "samples per digit" in capsys.readouterr().out


def test_euler_on_the_shipped_model_matches_its_sequential_twin():
    pipe = quiet(PCRDDPMPipeline(load_digits_pipeline().unet, DDPMScheduler()))
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(load_digits_pipeline().scheduler.config)
    kwargs = dict(batch_size=2, num_inference_steps=30, output_type="np")
    ref = pipe(generator=torch.Generator().manual_seed(0), parallel=1, **kwargs).images
    out = pipe(generator=torch.Generator().manual_seed(0), tolerance=3e-5, **kwargs)
    assert out.stats.converged and np.abs(out.images - ref).max() <= 1e-4
