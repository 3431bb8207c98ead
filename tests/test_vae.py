"""Wan-VAE tests: parity with diffusers' AutoencoderKLWan on the tiny preset, causality, the full-size
parameter layout, and input checks. CPU, fp32, a few seconds."""
import json

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from model.config import PRESETS, VAEConfig
from model.keymaps import vae_keys
from model.loader import load_part
from model.vae import WanVAE

TINY = PRESETS["tiny"].vae


def load_ours(folder) -> WanVAE:
    """A diffusers AutoencoderKLWan folder -> our WanVAE with the project loader (meta build, strict load)."""
    config = json.loads((folder / "config.json").read_text())
    assert config["attn_scales"] == [], "our VAE has attention only in the middle blocks, like Wan2.1"
    return load_part("vae", str(folder / "diffusion_pytorch_model.safetensors"), PRESETS["tiny"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny diffusers VAE with every parameter perturbed (gammas too), and ours loaded from its folder."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=TINY.base_dim, z_dim=TINY.z_dim, dim_mult=list(TINY.dim_mult),
                           num_res_blocks=TINY.num_res_blocks, attn_scales=[],
                           temperal_downsample=list(TINY.temporal_downsample),
                           latents_mean=list(TINY.latents_mean), latents_std=list(TINY.latents_std)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_vae")
    ref.save_pretrained(folder)
    return ref, load_ours(folder)


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    view = (1, -1, 1, 1, 1)
    return torch.tensor(TINY.latents_mean).view(view), torch.tensor(TINY.latents_std).view(view)


@pytest.mark.parametrize("frames,batch", [(1, 2), (5, 1), (9, 2)])
@torch.no_grad()
def test_matches_diffusers(pair, frames, batch):
    """Encode moments, sampled latent and decode match diffusers AutoencoderKLWan within 1e-4."""
    ref, ours = pair
    video = torch.rand(batch, 3, frames, 32, 32, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    shift, scale = _stats()

    posterior = ref.encode(video).latent_dist
    mean, logvar = ours.moments(video)
    assert mean.shape == (batch, TINY.z_dim, 1 + (frames - 1) // 4, 4, 4)
    torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-4)
    # normalized latent, the original WanVAE.encode: (mu - latents_mean) / latents_std
    torch.testing.assert_close(ours.encode(video), (posterior.mean - shift) / scale, rtol=0, atol=1e-4)

    # posterior sample from the same CPU seed
    sample_ref = posterior.sample(generator=torch.Generator().manual_seed(7))
    sample_ours = ours.encode(video, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(sample_ref, posterior.mean), "the sample must differ from the mean"
    torch.testing.assert_close(sample_ours, (sample_ref - shift) / scale, rtol=0, atol=1e-4)

    video_ref = ref.decode(posterior.mean).sample
    video_ours = ours.decode_raw(posterior.mean)
    assert video_ours.shape == video.shape
    assert (video_ref.abs() < 1).float().mean() > 0.5, "most pixels must be unclamped for a meaningful check"
    torch.testing.assert_close(video_ours, video_ref, rtol=0, atol=1e-4)
    # decode of a normalized latent = diffusers decode after the pipeline's un-normalization
    torch.testing.assert_close(ours.decode(sample_ours), ref.decode(sample_ref).sample, rtol=0, atol=1e-4)

    print(f"\nT={frames} B={batch}: max|d| mean {(mean - posterior.mean).abs().max():.2e} "
          f"logvar {(logvar - posterior.logvar).abs().max():.2e} "
          f"sample {(sample_ours - (sample_ref - shift) / scale).abs().max():.2e} "
          f"decode {(video_ours - video_ref).abs().max():.2e}")


@torch.no_grad()
def test_causal(pair):
    """The first 5 frames encode to the first 2 latent frames of a 9-frame encode; same for decode."""
    _, ours = pair
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean9, logvar9 = ours.moments(video)
    mean5, logvar5 = ours.moments(video[:, :, :5])
    # chunk by chunk the computation is identical, so the values are bit-for-bit equal
    torch.testing.assert_close(mean5, mean9[:, :, :2], rtol=0, atol=0)
    torch.testing.assert_close(logvar5, logvar9[:, :, :2], rtol=0, atol=0)
    video5 = ours.decode_raw(mean9[:, :, :2])                 # 2 latent frames -> 5 video frames
    torch.testing.assert_close(video5, ours.decode_raw(mean9)[:, :, :5], rtol=0, atol=0)


@torch.no_grad()
def test_runs_in_bfloat16(pair):
    """A bf16 copy takes fp32 video, returns bf16 and stays within 5% (relative L2) of fp32."""
    _, ours = pair
    half = WanVAE(TINY).to(torch.bfloat16).eval()
    half.load_state_dict(ours.state_dict())
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z, z_half = ours.encode(video), half.encode(video)
    out, out_half = ours.decode(z), half.decode(z)
    assert z_half.dtype == out_half.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (~0.4% per op); errors compound over ~30 layers
    assert (z_half.float() - z).norm() / z.norm() < 0.05
    assert (out_half.float() - out).norm() / out.norm() < 0.05


def test_full_size_layout_matches_checkpoints():
    """Full size: names and shapes equal the mapped diffusers ones, 126,892,531 params, converter agrees."""
    with torch.device("meta"):
        ours = WanVAE(VAEConfig())
        ref = AutoencoderKLWan()
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {vae_keys().to_ours(k): s for k, s in ref_shapes.items()} == ours_shapes
    assert len(ours_shapes) == 194
    assert sum(p.numel() for p in ours.parameters()) == 126_892_531
    # independent check: diffusers' own original->diffusers converter applied to our names
    converted = convert_wan_vae_to_diffusers(dict(ours.state_dict()))
    assert {k: v.shape for k, v in converted.items()} == ref_shapes


def test_unknown_key_raises():
    """An unmapped diffusers key raises a KeyError that names it."""
    with pytest.raises(KeyError, match="encoder.down_blocks.0.attentions.0.norm.gamma"):
        vae_keys().to_ours("encoder.down_blocks.0.attentions.0.norm.gamma")


def test_rejects_bad_video_size():
    """T not of the form 4k+1, or H/W not divisible by 8, raise a ValueError saying so."""
    vae = WanVAE(TINY)
    with pytest.raises(ValueError, match=r"T=7 frames is not of the form 4k\+1"):
        vae.encode(torch.zeros(1, 3, 7, 32, 32))
    with pytest.raises(ValueError, match="H=30 and W=32 must both be divisible by the spatial factor 8"):
        vae.encode(torch.zeros(1, 3, 5, 30, 32))
