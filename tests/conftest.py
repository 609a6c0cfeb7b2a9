import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from hypothesis import settings
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

# Property-based tests draw the same examples on every run by default, so CI is repeatable;
# `HYPOTHESIS_PROFILE=explore pytest tests/test_acceptance.py` draws fresh ones.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16
# Stable Diffusion 1.5's and SDXL's training noise schedule and timestep spacing.
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
)


def tiny_unet2d(**overrides) -> UNet2DModel:
    """A random UNet2DModel with self-attention, 8x8 single-channel: small enough for many sampling runs."""
    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    return UNet2DModel(**{**config, **overrides})


@pytest.fixture(scope="session")
def tiny_unet():
    # float64: the random chain is ill-conditioned, float32 rounding would blur the tests
    return tiny_unet2d().double().eval()


# Tiny text-to-image components, built from configs in code (no hub). Plain functions, so that
# benchmarks/text_to_image.py builds the same ones; the fixtures below hold them in float64.


def tiny_clip_tokenizer(directory):
    """A CLIPTokenizer from a small byte-level BPE vocabulary written to `directory` (vocab.json, merges.txt)."""
    chars = sorted(ByteLevel.alphabet())
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>"]
    vocab = [*chars, *(c + "</w>" for c in chars), "at</w>", "cat</w>", "do", "dog</w>", BOS, EOS]
    directory = Path(directory)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_TOKENS)


def _clip_config(tokenizer, hidden_size=32, **kwargs):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        **kwargs,
    )


def _tiny_vae(**kwargs):
    """4 latent channels, downsampling by 2: 16x16 images from 8x8 latents."""
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        **kwargs,
    )


def _tiny_unet(**kwargs):
    """A UNet2DConditionModel for 8x8 latents with 4 channels and one cross-attention block."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kwargs,
    )


def _seeded(dtype, **modules):
    """The modules, each built after `torch.manual_seed(0)` (callables), in `dtype` and eval mode."""
    out = {}
    for name, build in modules.items():
        torch.manual_seed(0)
        module = build()
        # `double()`, as diffusers' `to(dtype)` warns about float32 modules these models do not have
        out[name] = (module.double() if dtype == torch.float64 else module.to(dtype)).eval()
    return out


def tiny_stable_diffusion_components(directory, dtype=torch.float32):
    """StableDiffusionPipeline components: UNet2DConditionModel (8x8 latents), CLIPTextModel, tokenizer, VAE; the
    scheduler is DDIM with SD 1.5's config; no safety checker."""
    tokenizer = tiny_clip_tokenizer(directory)
    unet = partial(_tiny_unet, cross_attention_dim=32, attention_head_dim=4)
    modules = _seeded(dtype, unet=unet, vae=_tiny_vae, text_encoder=lambda: CLIPTextModel(_clip_config(tokenizer)))
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False)
    return dict(
        **modules,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl_components(directory, dtype=torch.float32):
    """StableDiffusionXLPipeline components: a UNet with SDXL's text-time conditioning, CLIPTextModel and
    CLIPTextModelWithProjection (sharing one tokenizer), VAE, and SDXL's Euler scheduler config."""
    tokenizer = tiny_clip_tokenizer(directory)
    unet = partial(
        _tiny_unet,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids x 8, and text_encoder_2's projection
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
    )
    modules = _seeded(
        dtype,
        unet=unet,
        vae=_tiny_vae,
        text_encoder=lambda: CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32)),
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER_CONFIG)
    return dict(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


def tiny_stable_diffusion_3_components(directory, dtype=torch.float32):
    """StableDiffusion3Pipeline components: SD3Transformer2DModel (8x8 latents, patch 1), two
    CLIPTextModelWithProjection, VAE with a shift factor, flow-matching Euler with SD3's shift; no T5 (the pipeline
    then uses zeros for its embeddings, as diffusers documents for dropping T5)."""
    tokenizer = tiny_clip_tokenizer(directory)
    transformer = partial(
        SD3Transformer2DModel,
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,  # both CLIP projections, concatenated
        out_channels=4,
    )
    modules = _seeded(
        dtype,
        transformer=transformer,
        vae=partial(_tiny_vae, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32)),
        text_encoder_2=lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32)),
    )
    return dict(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


@pytest.fixture(scope="session")
def tiny_sd_components(tmp_path_factory):
    """Float64 (see tests/test_text_to_image.py); build a fresh pipeline per test, the modules are shared."""
    return tiny_stable_diffusion_components(tmp_path_factory.mktemp("sd-tokenizer"), torch.float64)


@pytest.fixture(scope="session")
def tiny_sdxl_components(tmp_path_factory):
    return tiny_stable_diffusion_xl_components(tmp_path_factory.mktemp("sdxl-tokenizer"), torch.float64)


@pytest.fixture(scope="session")
def tiny_sd3_components(tmp_path_factory):
    return tiny_stable_diffusion_3_components(tmp_path_factory.mktemp("sd3-tokenizer"), torch.float64)


def tiny_flux_pipeline_components(directory, dtype=torch.float32, guidance_embeds=True):
    """FluxPipeline components: FluxTransformer2DModel (16 packed channels: the VAE's 4 latent channels in 2x2
    patches; with or without the guidance embedding), CLIPTextModel (its pooled output), a T5EncoderModel from a
    tiny T5Config, VAE with Flux's scaling and shift factors, and Flux's dynamically shifted flow-matching scheduler.
    Both text encoders read the CLIP tokenizer built in code: a T5 tokenizer would need the hub, and the T5 encoder
    only reads token ids."""
    tokenizer = tiny_clip_tokenizer(directory)
    transformer = partial(
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's hidden size
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    modules = _seeded(
        dtype,
        transformer=transformer,
        vae=partial(_tiny_vae, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=lambda: CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=lambda: T5EncoderModel(t5),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, use_dynamic_shifting=True
    )
    return dict(**modules, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_flux_components(tmp_path_factory):
    """Float64, with the guidance embedding; tests/test_flux.py builds the variant without it."""
    return tiny_flux_pipeline_components(tmp_path_factory.mktemp("flux-tokenizer"), torch.float64)


def tiny_controlnet_components(directory, dtype=torch.float32):
    """StableDiffusionControlNetPipeline components: the tiny SD ones and a ControlNet made from the tiny UNet
    (`ControlNetModel.from_unet`, 16x16 control images), whose zero-initialised convolutions (which make a fresh
    ControlNet change nothing) are drawn at random, so that the control image and its scale matter."""
    from diffusers import ControlNetModel

    def controlnet():
        unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=4)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        for conv in (net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block):
            conv.reset_parameters()
        return net

    components = tiny_stable_diffusion_components(directory, dtype)
    return dict(components, **_seeded(dtype, controlnet=controlnet), image_encoder=None)


def tiny_wan_components(directory, dtype=torch.float32):
    """WanPipeline components at diffusers' fast-test sizes: WanTransformer3DModel (patch (1, 2, 2)), the Wan VAE
    (8x spatial, 4x temporal: 32x32 videos of 9 frames are latents `(16, 3, 4, 4)`), a UMT5 encoder behind the tiny
    CLIP tokenizer (WanPipeline takes any tokenizer; UMT5's own needs the hub), and Wan's default scheduler, UniPC
    with flow sigmas (shift 3)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_clip_tokenizer(directory)
    text_config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vae = partial(
        AutoencoderKLWan,
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = partial(
        WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    modules = _seeded(dtype, transformer=transformer, vae=vae, text_encoder=lambda: UMT5EncoderModel(text_config))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return dict(**modules, tokenizer=tokenizer, scheduler=scheduler, transformer_2=None)
