"""Precision: model/loader.py's policy (which tensors stay fp32), the bf16 DiT against diffusers' bf16,
and adapters applied at inference without losing their small delta to bf16 rounding (lora/lora.py)."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora.lora import LoRALinear, apply_adapters, inject, lora_modules, save_adapter
from model.config import PRESETS, DiTConfig
from model.dit import WanDiT
from model.loader import DTYPES, load_part, load_wan, storage_dtype
from model.vae import WanVAE
from test_dit import diffusers_config, randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

# Wider than "tiny" (dim 24) so that bf16 rounding averages as in a real model; still a CPU second.
DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_dim=32,
                text_len=16, freq_dim=32, rope_max_len=32)
CFG = dataclasses.replace(PRESETS["tiny"], dit=DIT)
BF16 = torch.bfloat16


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def inputs(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents (B, C, 3, 8, 8), timesteps (B,) spread over [0, 1000] and text states (B, S, text_dim), fp32."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, DIT.in_dim, 3, 8, 8, generator=gen), torch.linspace(980.0, 20.0, batch),
            torch.randn(batch, DIT.text_len, DIT.text_dim, generator=gen))


def run(dit: WanDiT, x, t, context, autocast: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=autocast):
        return dit(x, t, context)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    """A random diffusers WanTransformer3DModel folder (the parity tests' conversion path)."""
    folder = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    reference = WanTransformer3DModel(**diffusers_config(DIT))
    randomize_(reference, seed=1)
    reference.save_pretrained(folder)
    return folder


def test_policy_keeps_small_modules_fp32(tmp_path):
    """load_wan(dtype=bf16): time MLPs, modulation, head and norms fp32, block linears bf16; VAE fp32 unless asked."""
    torch.manual_seed(0)
    save_file(WanDiT(PRESETS["tiny"].dit).state_dict(), tmp_path / "dit.safetensors")
    save_file(WanVAE(PRESETS["tiny"].vae).state_dict(), tmp_path / "vae.safetensors")
    files = dict(dit=str(tmp_path / "dit.safetensors"), vae=str(tmp_path / "vae.safetensors"))
    models = load_wan("tiny", parts=("dit", "vae"), dtype=BF16, **files)
    dtypes = {name: p.dtype for name, p in models.dit.named_parameters()}
    fp32 = {name for name, dtype in dtypes.items() if dtype == torch.float32}
    assert fp32 == {name for name in dtypes if name.startswith(("time_embedding.", "time_projection.", "head."))
                    or name.endswith(("modulation", "norm3.weight", "norm3.bias", "norm_q.weight", "norm_k.weight"))}
    for block in models.dit.blocks:
        linears = [block.self_attn.q, block.self_attn.o, block.cross_attn.k, block.ffn[0], block.ffn[2]]
        assert all(m.weight.dtype == m.bias.dtype == BF16 for m in linears)
    assert models.dit.patch_embedding.weight.dtype == models.dit.text_embedding[0].weight.dtype == BF16
    assert all(p.dtype == torch.float32 for p in models.vae.parameters())
    assert all(p.dtype == BF16 for p in load_wan("tiny", parts=("vae",), vae_dtype=BF16, **files).vae.parameters())
    # fp16 is a file format here, not a compute dtype
    assert set(DTYPES.values()) == {torch.float32, BF16} and storage_dtype("text", "norm.weight", BF16) == BF16
    with pytest.raises(ValueError, match="fp16 checkpoint files"):
        load_wan("tiny", parts=("dit",), dtype=torch.float16, **files)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_bf16_dit_no_worse_than_diffusers(dit_file, autocast):
    """Our bf16 DiT's error against our fp32 is at most 1.1x diffusers' bf16 error against its fp32."""
    weights = str(dit_file / "diffusion_pytorch_model.safetensors")
    ours32, ours16 = (load_part("dit", weights, CFG, dtype=dtype) for dtype in (torch.float32, BF16))
    # from_pretrained(torch_dtype=bf16) applies diffusers' _keep_in_fp32_modules, as its pipeline loads it.
    ref32 = WanTransformer3DModel.from_pretrained(dit_file, torch_dtype=torch.float32)
    ref16 = WanTransformer3DModel.from_pretrained(dit_file, torch_dtype=BF16)
    x, t, context = inputs()
    with torch.no_grad():
        expected = ref32(x, t, context, return_dict=False)[0]
        # diffusers' pipeline hands its transformer bf16 latents and text states, without autocast
        ref_err = rel_err(ref16(x.to(BF16), t, context.to(BF16), return_dict=False)[0], expected)
    out = run(ours16, x, t, context, autocast)
    assert out.dtype == torch.float32 and out.isfinite().all()
    ours_err = rel_err(out, run(ours32, x, t, context, autocast=False))
    print(f"bf16 vs fp32 relative error: ours {ours_err:.3e}, diffusers {ref_err:.3e}")
    assert ours_err <= 1.1 * ref_err + 1e-4


# ---- adapters on bf16 weights ----
# A trained rank-8 delta next to Wan's weights: base rms 2e-2, delta rms 4e-5 / 1.4e-4 / 4e-4.
DELTA_RMS = (4e-5, 1.4e-4, 4e-4)


def set_delta_(m: LoRALinear, rms: float, seed: int) -> None:
    """Random basis / coeff / residual, scaled so that delta_weight() has the given rms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (m.basis, m.coeff, m.residual):
            param.copy_(torch.randn(param.shape, generator=gen))
        m.basis.mul_(rms / m.delta_weight().square().mean().sqrt())


@pytest.mark.parametrize("rms", DELTA_RMS)
def test_bf16_layer_keeps_the_whole_delta(rms):
    """On a bf16 base, LoRALinear adds the fp32 delta to within 1%; merged into bf16 weights, >5% of it is lost."""
    torch.manual_seed(0)
    base = nn.Linear(1536, 1536)
    nn.init.normal_(base.weight, std=2e-2)
    x = torch.randn(64, 1536).to(BF16)
    m = LoRALinear(base.to(BF16), rank=8, alpha=8.0)
    set_delta_(m, rms, seed=1)
    with torch.no_grad():
        exact = x.float() @ m.delta_weight().T                     # the delta in fp32
        kept = m(x) - base(x).float()                              # unmerged: what the adapter adds
        # The old merge, W + delta stored in bf16: the delta it really applies, before any output rounding.
        merged = x.float() @ ((base.weight + m.delta_weight().to(BF16)).float() - base.weight.float()).T
    kept_err, merged_err = rel_err(kept, exact), rel_err(merged, exact)
    print(f"delta rms {rms:g}: relative error of the applied delta: unmerged {kept_err:.2g}, "
          f"bf16 merge {merged_err:.2g}")
    assert kept_err < 0.01 and merged_err > 0.05


def adapter_file(path, model: WanDiT, rms: float, seed: int) -> str:
    """Save a random rank-8 adapter on every block linear, its delta `rms` / 2e-2 times the base weight's rms."""
    inject(model, rank=8)
    for i, m in enumerate(lora_modules(model).values()):
        set_delta_(m, rms * m.base.weight.std().item() / 2e-2, seed + i)   # the same ratio to the base weight
    save_adapter(str(path), model, {"base_model_id": "test", "stage": "sequence"})
    return str(path)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
def test_bf16_adapters_stay_exact(dit_file, tmp_path, autocast):
    """Two stacked adapters on the bf16 DiT: its error against fp32 stays the adapter-free bf16 error."""
    weights = str(dit_file / "diffusion_pytorch_model.safetensors")
    load = lambda dtype: load_part("dit", weights, CFG, dtype=dtype)  # noqa: E731
    paths = [adapter_file(tmp_path / f"{i}.safetensors", load(torch.float32), DELTA_RMS[i], seed=10 * i)
             for i in range(2)]
    x, t, context = inputs()
    base32, base16 = run(load(torch.float32), x, t, context, False), run(load(BF16), x, t, context, autocast)
    out = {}
    for dtype in (torch.float32, BF16):
        for s_mot in (0.0, 1.0):
            dit = load(dtype)
            apply_adapters(dit, paths, "test", s_id=1.0, s_mot=s_mot)
            layers = lora_modules(dit)
            # fp32 weights merge (no LoRALinear left); bf16 keeps one per layer, both adapters concatenated
            assert (not layers) if dtype == torch.float32 else all(m.rank == 16 for m in layers.values())
            out[dtype, s_mot] = run(dit, x, t, context, autocast and dtype == BF16)
    noise = rel_err(base16, base32)                           # bf16 without adapters
    errs = [rel_err(out[BF16, s_mot], out[torch.float32, s_mot]) for s_mot in (0.0, 1.0)]
    print(f"bf16 vs fp32 relative error: without adapters {noise:.3e}, with them at s_mot 0 / 1 "
          f"{errs[0]:.3e} / {errs[1]:.3e}; they change the fp32 output by "
          f"{rel_err(out[torch.float32, 1.0], base32):.3e}")
    assert max(errs) <= 1.1 * noise
    # s_mot reaches the model: 0 and 1 differ by more than bf16's own noise
    apart = rel_err(out[BF16, 0.0], out[BF16, 1.0])
    print(f"s_mot 0 and 1: {apart:.3e} apart in bf16, "
          f"{rel_err(out[torch.float32, 0.0], out[torch.float32, 1.0]):.3e} in fp32")
    assert apart > noise
