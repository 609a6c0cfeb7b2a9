import pytest
import torch
from diffusers import UNet2DModel


@pytest.fixture(scope="session")
def tiny_unet():
    """A random UNet2DModel with self-attention, 8x8 single-channel: small enough for many sampling runs."""
    torch.manual_seed(0)
    unet = UNet2DModel(
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
    return unet.double().eval()  # float64: the random chain is ill-conditioned, float32 rounding would blur the test
