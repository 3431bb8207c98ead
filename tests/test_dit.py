"""Tests of model/dit.py (WanDiT) and the DiT key map, against diffusers' WanTransformer3DModel."""
from pathlib import Path

import pytest
import torch

from model.config import PRESETS
from model.dit import WanDiT
from model.keymaps import DIT_KEYS
from model.loader import load_part

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

TINY = PRESETS["tiny"].dit


def load_ours(folder: Path) -> WanDiT:
    """Load a diffusers WanTransformer3DModel folder into WanDiT with the project loader (meta build, strict)."""
    return load_part("dit", str(folder / "diffusion_pytorch_model.safetensors"), PRESETS["tiny"])


def diffusers_config(cfg) -> dict:
    """The WanTransformer3DModel arguments that describe the same network as our DiTConfig."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_len)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int):
    """Every parameter ~ N(0, 0.2^2), norm weights ~ 1 + N(0, 0.2^2), so no path is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = 0.2 * torch.randn(param.shape, generator=gen)
        is_norm_weight = "norm" in name and name.endswith("weight")
        param.copy_(noise + 1.0 if is_norm_weight else noise)


def text_states(batch_lengths: list[int], rows: int, gen: torch.Generator) -> torch.Tensor:
    """Random text states with sample i real for its first batch_lengths[i] rows and zero after."""
    context = torch.randn(len(batch_lengths), rows, TINY.text_dim, generator=gen)
    for i, length in enumerate(batch_lengths):
        context[i, length:] = 0
    return context


def test_matches_diffusers(tmp_path):
    """WanDiT loaded from a random diffusers checkpoint gives the diffusers output to rel 1e-5 (fp32)."""
    torch.manual_seed(0)
    reference = WanTransformer3DModel(**diffusers_config(TINY))
    randomize_(reference, seed=1)
    reference.save_pretrained(tmp_path)
    ours = load_ours(tmp_path)

    gen = torch.Generator().manual_seed(2)
    timesteps = {1: [999.0, 13.0], 2: [500.0, 937.0], 4: [1.0, 250.5]}
    for frames, ts in timesteps.items():
        x = torch.randn(2, TINY.in_dim, frames, 6, 8, generator=gen)
        t = torch.tensor(ts)
        context = text_states([7, 11], rows=11, gen=gen)  # ours pads to 16 inside forward
        padded = torch.cat([context, context.new_zeros(2, TINY.text_len - 11, TINY.text_dim)], dim=1)
        with torch.no_grad():
            expected = reference(x, t, padded, return_dict=False)[0]
            actual = ours(x, t, context)
        assert actual.dtype == torch.float32 and actual.shape == expected.shape == x.shape
        max_diff = (actual - expected).abs().max().item()
        rel = max_diff / expected.abs().max().item()
        print(f"F={frames} t={ts}: max|diff|={max_diff:.3g} "
              f"max|ref|={expected.abs().max():.3g} rel={rel:.3g}")
        assert rel <= 1e-5


@pytest.mark.parametrize("preset, num_params", [("wan2.1-t2v-1.3b", 1_418_996_800),
                                                ("wan2.1-t2v-14b", 14_288_491_584)])
def test_full_size_keys_and_shapes(preset, num_params):
    """At full size our state dict equals diffusers' under the key map; diffusers' converter agrees."""
    cfg = PRESETS[preset].dit
    with torch.device("meta"):
        ours = WanDiT(cfg)
        reference = WanTransformer3DModel(**diffusers_config(cfg))
    ours_shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    mapped = {DIT_KEYS.to_ours(key): tuple(value.shape)
              for key, value in reference.state_dict().items()}
    assert mapped == ours_shapes
    assert sum(p.numel() for p in ours.parameters()) == num_params
    # Independent check of the map: diffusers' original->diffusers converter on our names.
    converted = convert_wan_transformer_to_diffusers(dict(ours.state_dict()))
    assert set(converted) == set(reference.state_dict())


def test_gradient_checkpointing_is_exact():
    """Gradient checkpointing changes neither the output nor any gradient."""
    torch.manual_seed(0)
    model = WanDiT(TINY).train()
    randomize_(model, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, TINY.in_dim, 2, 4, 4, generator=gen)
    t = torch.tensor([700.0, 20.0])
    context = text_states([5, 9], rows=9, gen=gen)

    results = []
    for use_checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = use_checkpointing
        out = model(x, t, context)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], msg=name)


def test_text_padding_inside_forward():
    """Passing S=7 text rows equals passing the same rows already zero-padded to text_len."""
    model = WanDiT(TINY).eval()
    randomize_(model, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, TINY.in_dim, 1, 4, 6, generator=gen)
    t = torch.tensor([400.0, 800.0])
    short = torch.randn(2, 7, TINY.text_dim, generator=gen)
    padded = torch.cat([short, short.new_zeros(2, TINY.text_len - 7, TINY.text_dim)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, short), model(x, t, padded), rtol=0, atol=0)


def test_bf16_weights_under_autocast():
    """bf16 weights under bf16 autocast run forward and backward, return fp32 close to the fp32 model."""
    model = WanDiT(TINY).train()
    randomize_(model, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, TINY.in_dim, 2, 4, 4, generator=gen)
    t = torch.tensor([900.0, 100.0])
    context = text_states([4, 6], rows=6, gen=gen)
    with torch.no_grad():
        expected = model(x, t, context)
    model.to(torch.bfloat16).gradient_checkpointing = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model(x, t, context)
    actual.square().mean().backward()
    assert actual.dtype == torch.float32
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    # A smoke bound, not parity: bf16 keeps 8 mantissa bits (0.4% per rounding), and the weights,
    # projections and attention are all rounded; an fp32/bf16 mix-up would be far off.
    assert (actual - expected).abs().max() <= 0.03 * expected.abs().max()


def test_rope_tables_cached_per_grid():
    """The RoPE tables are built once per token grid and reused by later calls."""
    model = WanDiT(TINY).eval()
    x = torch.randn(1, TINY.in_dim, 2, 4, 4)
    t, context = torch.tensor([10.0]), torch.randn(1, 3, TINY.text_dim)
    with torch.no_grad():
        model(x, t, context)
        first = model.rope.tables[((2, 2, 2), x.device)]
        model(x, t, context)
    assert len(model.rope.tables) == 1
    assert model.rope.tables[((2, 2, 2), x.device)][0] is first[0]


def test_unknown_diffusers_key_raises():
    """The key map refuses keys it does not know, naming them."""
    with pytest.raises(KeyError, match="blocks.0.attn2.add_k_proj.weight"):
        DIT_KEYS.to_ours("blocks.0.attn2.add_k_proj.weight")
