"""Invariants of the Set-and-Sequence LoRA (lora/lora.py) and its plain-LoRA export (lora/export.py)."""
import math

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora.lora import (LoRALinear, adapter_state_dict, default_targets, inject, load_adapter, lora_modules,
                       save_adapter, set_stage, trainable_parameters)
from model.config import PRESETS
from model.dit import WanDiT

TINY = PRESETS["tiny"].dit


# ---- two models with the original Wan module names: a small stand-in and the tiny WanDiT ----
class StandInAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.q(x) @ self.k(context).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.o(weights @ self.v(context))


class StandInBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # a trainable non-target tensor, must stay frozen
        self.self_attn = StandInAttention(dim)
        self.cross_attn = StandInAttention(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(x, context)
        return x + self.ffn(x)


class StandInDiT(nn.Module):
    def __init__(self, dim: int = 16, num_layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList([StandInBlock(dim) for _ in range(num_layers)])
        self.head = nn.Linear(dim, dim)  # outside the blocks: not a default target

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context)
        return self.head(x)


def make_model(kind: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """A fresh model and one input batch for it; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if kind == "standin":
        return StandInDiT(), (torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    model = WanDiT(TINY)
    nn.init.normal_(model.head.head.weight, std=0.1)  # Wan zero-inits the head: output would be 0
    return model, (torch.randn(1, 4, 2, 4, 4), torch.tensor([400.0]), torch.randn(1, 16, TINY.text_dim))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero basis, coeff and residual everywhere, so every term of the delta is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def train_steps(model: nn.Module, inputs: tuple, steps: int = 3) -> None:
    """A few AdamW steps (with weight decay) on the trainable tensors only, as the training loop does."""
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2, weight_decay=0.01)
    target = torch.randn_like(model(*inputs))
    model.train()
    for _ in range(steps):
        loss = (model(*inputs) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


MODELS = pytest.mark.parametrize("kind", ["standin", "wandit"])
SIDES = pytest.mark.parametrize("side", ["output", "input"])   # where the shared basis sits


# ---- injection ----
@MODELS
def test_default_targets_are_the_ten_block_linears(kind):
    """Default targets = self_attn q/k/v/o, cross_attn q/k/v/o, ffn.0, ffn.2 of every block."""
    model, _ = make_model(kind)
    expected = [f"blocks.{i}.{layer}" for i in range(2) for layer in
                ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
    targets = default_targets(model)
    assert sorted(targets) == sorted(expected)
    assert inject(model) == targets and sorted(lora_modules(model)) == sorted(expected)


def test_inject_rejects_unknown_and_non_linear_targets():
    """An explicit target that is missing or not an nn.Linear raises an error naming it."""
    model, _ = make_model("standin")
    with pytest.raises(ValueError, match=r"'blocks\.0\.self_attn\.x' is not a module"):
        inject(model, targets=["blocks.0.self_attn.q", "blocks.0.self_attn.x"])
    with pytest.raises(ValueError, match=r"'blocks\.0\.norm' is a LayerNorm"):
        inject(model, targets=["blocks.0.norm"])
    assert not lora_modules(model)  # a failed inject leaves the model untouched


# ---- exact no-op ----
@MODELS
@SIDES
def test_adapter_is_exact_noop_at_init(kind, side):
    """Right after inject the output is bit-identical to the base model, in eval and in stage-set training mode."""
    model, inputs = make_model(kind)
    with torch.no_grad():
        reference = model(*inputs)
        inject(model, basis_side=side)
        assert torch.equal(model.eval()(*inputs), reference)
        set_stage(model, "set")
        assert torch.equal(model.train()(*inputs), reference)  # DropConnect on coeff, basis still zero


@MODELS
@SIDES
def test_sequence_stage_starts_as_the_set_model(kind, side):
    """After stage-set training, switching to stage sequence (zero residual) changes no output bit."""
    model, inputs = make_model(kind)
    with torch.no_grad():
        base_out = model(*inputs)
    inject(model, basis_side=side)
    set_stage(model, "set")
    train_steps(model, inputs)
    with torch.no_grad():
        set_out = model(*inputs)
        assert not torch.allclose(set_out, base_out)  # stage set did learn something
        set_stage(model, "sequence")
        assert torch.equal(model.eval()(*inputs), set_out)
        assert torch.equal(model.train()(*inputs), set_out)  # DropConnect on a zero residual


# ---- stages ----
@MODELS
@SIDES
def test_stages_train_exactly_their_tensors(kind, side):
    """Stage set changes only basis+coeff, stage sequence only residual; everything else stays bit-identical."""
    model, inputs = make_model(kind)
    inject(model, basis_side=side)
    names = list(lora_modules(model))
    for stage, trained in (("set", ("basis", "coeff")), ("sequence", ("residual",))):
        set_stage(model, stage)
        expected = {f"{name}.{tensor}" for name in names for tensor in trained}
        assert set(trainable_parameters(model)) == expected
        before = {key: value.clone() for key, value in model.state_dict().items()}
        train_steps(model, inputs)
        after = model.state_dict()
        changed = {key for key in before if not torch.equal(before[key], after[key])}
        assert changed == expected


# ---- DropConnect (Eq. 10) ----
def dropped(module: LoRALinear, draws: int) -> torch.Tensor:
    """`draws` samples of the effective coefficients: (draws, r, in)."""
    return torch.stack([module.effective_coeff().detach() for _ in range(draws)])


@pytest.mark.parametrize("stage, p", [("set", 0.8), ("sequence", 0.5)])
def test_dropconnect_rate_and_expectation(stage, p):
    """Mask rate is p within 4 sigma, and the mean over draws is the undropped matrix (inverted scaling)."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.lin = nn.Linear(64, 32)
    inject(layer, targets=["lin"])
    module = layer.lin
    with torch.no_grad():
        module.residual.normal_()
    set_stage(layer, stage)
    assert module.p == p  # the paper's per-stage default
    layer.train()
    draws = 400
    samples = dropped(module, draws)
    # Stage set masks coeff (the random residual passes as is), stage sequence the residual only.
    masked, fixed = (module.coeff, module.residual) if stage == "set" else (module.residual, module.coeff)
    entries = samples - fixed.detach()  # the masked matrix's share of each draw; exactly 0 where dropped
    keep = entries != 0
    rate = 1 - keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - p) < 4 * sigma
    # Kept entries are exactly the masked matrix scaled by 1/(1-p).
    torch.testing.assert_close(entries, masked.detach() * keep / (1 - p))
    # E[mean] = matrix; its relative squared error is p / ((1-p) * draws) in expectation.
    rel_err = (entries.mean(0) - masked.detach()).norm() / masked.detach().norm()
    assert rel_err < 1.5 * math.sqrt(p / ((1 - p) * draws))


def test_dropconnect_in_sequence_never_touches_coeff():
    """Stage sequence with a zero residual uses the frozen coeff unmasked, even in training mode."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.lin = nn.Linear(64, 32)
    inject(layer, targets=["lin"])
    set_stage(layer, "sequence")
    layer.train()
    assert all(torch.equal(sample, layer.lin.coeff.detach()) for sample in dropped(layer.lin, 20))


@pytest.mark.parametrize("stage", ["set", "sequence"])
def test_dropconnect_off_in_eval(stage):
    """In eval mode the coefficients are the plain coeff + residual, the same on every call."""
    model, inputs = make_model("standin")
    inject(model)
    randomize_adapters(model)
    set_stage(model, stage)
    model.eval()
    with torch.no_grad():
        first = model(*inputs)
        assert torch.equal(model(*inputs), first)
        for m in lora_modules(model).values():
            assert torch.equal(m.effective_coeff(), m.coeff + m.residual)


# ---- strengths ----
def test_strengths_scale_identity_and_motion():
    """delta = (alpha/r) * basis @ (s_id*coeff + s_mot*residual), and the forward applies exactly it."""
    torch.manual_seed(0)
    layer = nn.Module()
    layer.lin = nn.Linear(24, 12)
    inject(layer, targets=["lin"], rank=4, alpha=10.0)  # scale 2.5
    randomize_adapters(layer)
    m = layer.lin
    m.s_id, m.s_mot = 0.3, 1.7
    expected = 2.5 * m.basis @ (0.3 * m.coeff + 1.7 * m.residual)
    torch.testing.assert_close(m.delta_weight(), expected)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.base(x) + x @ expected.T)


# ---- save / load ----
META = {"base_model_id": "tiny-seed0", "stage": "sequence", "prompts": {"set": "a [v] man"},
        "tokens": ["[v]", "[u]"], "config": {"rank": 8, "lr": 1e-4}}


@MODELS
def test_save_load_round_trip_is_bit_exact(kind, tmp_path):
    """A saved adapter loads into a fresh injected model bit-exactly, with its metadata."""
    model, inputs = make_model(kind)
    inject(model)
    randomize_adapters(model)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(path, model, META)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no .tmp left behind
    fresh, _ = make_model(kind)
    inject(fresh)
    meta = load_adapter(path, fresh, base_model_id="tiny-seed0")
    assert {k: meta[k] for k in META} == META and meta["rank"] == 8
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*inputs), model.eval()(*inputs))


def test_strict_load_rejects_mismatches(tmp_path):
    """Another rank, target set, base-model id, or a missing tensor each fail with a message naming it."""
    model, _ = make_model("standin")
    inject(model)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(path, model, META)

    other_rank, _ = make_model("standin")
    inject(other_rank, rank=4)
    with pytest.raises(ValueError, match="rank=8.*rank=4"):
        load_adapter(path, other_rank, base_model_id="tiny-seed0")

    other_side, _ = make_model("standin")
    inject(other_side, basis_side="input")
    with pytest.raises(ValueError, match="basis_side=output.*basis_side=input"):
        load_adapter(path, other_side, base_model_id="tiny-seed0")

    fewer_targets, _ = make_model("standin")
    inject(fewer_targets, targets=default_targets(fewer_targets)[:-1])
    with pytest.raises(ValueError, match=r"only in the file: \['blocks\.1\.ffn\.2'\]"):
        load_adapter(path, fewer_targets, base_model_id="tiny-seed0")

    fresh, _ = make_model("standin")
    inject(fresh)
    with pytest.raises(ValueError, match="trained on base model 'tiny-seed0', not 'wan2.1-t2v-1.3b'"):
        load_adapter(path, fresh, base_model_id="wan2.1-t2v-1.3b")

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    del tensors["blocks.0.cross_attn.v.residual"]
    broken = str(tmp_path / "broken.safetensors")
    save_file(tensors, broken, metadata=metadata)
    with pytest.raises(ValueError, match=r"missing: \['blocks\.0\.cross_attn\.v\.residual'\]"):
        load_adapter(broken, fresh, base_model_id="tiny-seed0")


# ---- where the basis sits (docs/method.md#decisions: output; input kept for eval.py's comparison) ----
@SIDES
def test_forward_is_base_plus_the_delta_in_the_basis_span(side):
    """y = W x + delta x, and delta's columns (output side) or rows (input side) lie in the basis' span."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), rank=3, alpha=6.0, basis_side=side)
    with torch.no_grad():
        for param in (layer.basis, layer.coeff, layer.residual):
            param.normal_()
    x = torch.randn(4, 12)
    delta = layer.delta_weight()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T)
    basis = layer.basis if side == "output" else layer.basis.T           # (out, r) or (in, r)
    span = delta if side == "output" else delta.T
    projected = basis @ torch.linalg.lstsq(basis, span).solution           # projection onto the basis' span
    torch.testing.assert_close(projected, span, atol=1e-4, rtol=1e-4)
    shapes = {"output": ((10, 3), (3, 12)), "input": ((3, 12), (10, 3))}[side]
    assert (tuple(layer.basis.shape), tuple(layer.coeff.shape)) == shapes
    assert layer.residual.shape == layer.coeff.shape


@pytest.mark.parametrize("stage", ["set", "sequence"])
def test_dropconnect_masks_are_redrawn_equal_when_checkpointing_recomputes(stage):
    """Gradient checkpointing recomputes each block with the same DropConnect masks: the same gradients."""
    grads = []
    for checkpointing in (False, True):
        model, inputs = make_model("wan")
        inject(model, rank=4)
        randomize_adapters(model)
        set_stage(model, stage, p=0.5)
        model.train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(7)                                  # the stream the masks are drawn from
        model(*inputs).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)
    # ... and the masks matter: another stream gives other gradients
    model, inputs = make_model("wan")
    inject(model, rank=4)
    randomize_adapters(model)
    set_stage(model, stage, p=0.5)
    model.train()
    torch.manual_seed(8)
    model(*inputs).pow(2).mean().backward()
    assert any(not torch.allclose(p.grad, grads[0][k]) for k, p in trainable_parameters(model).items())
