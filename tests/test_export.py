"""lora/export.py: plain-LoRA export for ComfyUI and diffusers, single and split (identity / motion)."""
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

from lora.export import export_lora, export_split
from lora.lora import inject, lora_modules
from model.dit import WanDiT
from test_lora import SIDES, TINY, make_model, randomize_adapters

# ---- export ----
DIFFUSERS_NAMES = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                   "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                   "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                   "ffn.2": "ffn.net.2"}


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
@SIDES
def test_export_keys_and_product_equal_the_delta(fmt, side, tmp_path):
    """The exported key set is exact and lora_B @ lora_A is our delta (strengths and scale baked in)."""
    model, _ = make_model("wandit")
    targets = inject(model, rank=4, alpha=8.0, basis_side=side)
    randomize_adapters(model)
    path = str(tmp_path / "lora.safetensors")
    export_lora(model, path, fmt, s_id=0.7, s_mot=1.3)
    tensors = load_file(path)
    if fmt == "comfyui":
        prefixes = {name: f"diffusion_model.{name}" for name in targets}
        leaves = ("lora_A.weight", "lora_B.weight", "alpha")
    else:
        prefixes = {name: "transformer." + name for name in targets}
        for original, converted in DIFFUSERS_NAMES.items():
            prefixes = {n: p.replace(f".{original}", f".{converted}") for n, p in prefixes.items()}
        leaves = ("lora_A.weight", "lora_B.weight")
    expected = {f"{prefix}.{leaf}" for prefix in prefixes.values() for leaf in leaves}
    assert set(tensors) == expected
    for name, m in lora_modules(model).items():
        m.s_id, m.s_mot = 0.7, 1.3
        product = tensors[f"{prefixes[name]}.lora_B.weight"] @ tensors[f"{prefixes[name]}.lora_A.weight"]
        torch.testing.assert_close(product, m.delta_weight().detach())
        if fmt == "comfyui":
            assert tensors[f"{prefixes[name]}.alpha"].item() == 4.0  # alpha = r: loaders scale by 1


def diffusers_wan() -> nn.Module:
    """diffusers' WanTransformer3DModel at the tiny preset, the same random weights every call."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=TINY.patch_size, num_attention_heads=TINY.num_heads, attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_dim, out_channels=TINY.out_dim, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim, num_layers=TINY.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=TINY.eps, rope_max_seq_len=TINY.rope_max_len)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.2)
    return model.eval()


def ours_and_inputs(side: str = "output") -> tuple[nn.Module, tuple]:
    """Our WanDiT with diffusers_wan()'s weights and random adapters, and one (x, t, context) batch."""
    from model.keymaps import DIT_KEYS
    with torch.device("meta"):
        ours = WanDiT(TINY)
    ours.load_state_dict({DIT_KEYS.to_ours(k): v.clone() for k, v in diffusers_wan().state_dict().items()},
                         strict=True, assign=True)
    inject(ours, rank=4, alpha=8.0, basis_side=side)
    randomize_adapters(ours)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)                  # (B, C, F, H, W) latents
    context = torch.randn(1, TINY.text_len, TINY.text_dim, generator=g)  # full text_len: no padding differences
    return ours.eval(), (x, torch.tensor([300.0]), context)


def our_output(ours: nn.Module, inputs: tuple, s_id: float, s_mot: float) -> torch.Tensor:
    """Our model's output at the given strengths, checked to differ from the base far above tolerance."""
    for m in lora_modules(ours).values():
        m.s_id, m.s_mot = s_id, s_mot
    with torch.no_grad():
        out = ours(*inputs)
        base_out = diffusers_wan()(*inputs, return_dict=False)[0]
    assert (out - base_out).abs().max() > 1e-2 * base_out.abs().max()  # the delta is far above tolerance
    return out


def test_export_matches_diffusers_lora_loaders(tmp_path):
    """Both exported files, loaded by diffusers' own Wan LoRA loaders, give our output within 1e-5 relative."""
    pytest.importorskip("peft")  # diffusers' LoRA loading runs on peft (requirements-dev.txt)
    from diffusers.loaders import WanLoraLoaderMixin

    ours, inputs = ours_and_inputs()
    our_out = our_output(ours, inputs, s_id=0.8, s_mot=1.2)
    for fmt in ("comfyui", "diffusers"):
        path = str(tmp_path / f"{fmt}.safetensors")
        export_lora(ours, path, fmt, s_id=0.8, s_mot=1.2)
        theirs = diffusers_wan()
        # WanPipeline.load_lora_weights = lora_state_dict (converts the ComfyUI/original keys)
        # followed by load_lora_into_transformer; the same two calls, without a whole pipeline.
        state_dict = WanLoraLoaderMixin.lora_state_dict(path)
        WanLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=theirs)
        with torch.no_grad():
            their_out = theirs(*inputs, return_dict=False)[0]
        assert (our_out - their_out).abs().max() <= 1e-5 * their_out.abs().max(), fmt


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
@SIDES
def test_split_export_adds_up_to_the_single_export(fmt, side, tmp_path):
    """The identity and motion files have the single export's keys, and their deltas sum to it at (1, 1)."""
    model, _ = make_model("wandit")
    inject(model, rank=4, alpha=8.0, basis_side=side)
    randomize_adapters(model)
    single = export_lora(model, str(tmp_path / "lora.safetensors"), fmt, s_id=1.0, s_mot=1.0)
    paths = export_split(model, str(tmp_path / "lora.safetensors"), fmt)
    assert paths == (str(tmp_path / "lora-identity.safetensors"), str(tmp_path / "lora-motion.safetensors"))
    identity, motion = (load_file(p) for p in paths)
    assert set(identity) == set(motion) == set(single)
    for key in (k.removesuffix(".lora_A.weight") for k in single if k.endswith(".lora_A.weight")):
        product = {part: t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"]
                   for part, t in (("single", single), ("identity", identity), ("motion", motion))}
        torch.testing.assert_close(product["identity"] + product["motion"], product["single"])
    with safe_open(paths[1], "pt") as f:
        assert f.metadata()["part"] == "motion"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on a second adapter
@SIDES
def test_split_export_matches_diffusers_two_adapters(side, tmp_path):
    """Both split files loaded as two diffusers adapters with weights [a, b] give our output at s_id=a, s_mot=b."""
    pytest.importorskip("peft")
    from diffusers.loaders import WanLoraLoaderMixin

    ours, inputs = ours_and_inputs(side)
    our_out = our_output(ours, inputs, s_id=0.7, s_mot=1.3)
    for fmt in ("comfyui", "diffusers"):
        identity_path, motion_path = export_split(ours, str(tmp_path / f"{fmt}.safetensors"), fmt)
        theirs = diffusers_wan()
        # WanPipeline.load_lora_weights(path, adapter_name=...) twice, then pipe.set_adapters(..., weights).
        for name, path in (("identity", identity_path), ("motion", motion_path)):
            WanLoraLoaderMixin.load_lora_into_transformer(WanLoraLoaderMixin.lora_state_dict(path),
                                                          transformer=theirs, adapter_name=name)
        theirs.set_adapters(["identity", "motion"], weights=[0.7, 1.3])
        with torch.no_grad():
            their_out = theirs(*inputs, return_dict=False)[0]
        assert (our_out - their_out).abs().max() <= 1e-5 * their_out.abs().max(), fmt


