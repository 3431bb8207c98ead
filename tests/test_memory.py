"""Memory savers: fp8 block linears (model/fp8.py, ComfyUI fp8 files in model/loader.py), block offload
(model/offload.py) and checkpointed activations kept in bf16 or on the CPU (model/dit.py)."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora.lora import inject, lora_modules, merge, set_stage, trainable_parameters
from model.checkpoint import CheckpointError
from model.config import PRESETS, DiTConfig
from model.dit import WanDiT
from model.fp8 import FP8, FP8Linear, quantize_fp8, to_fp8, upcast
from model.loader import load_part
from model.offload import offload_blocks

# Four blocks: two offloaded, two resident, so the prefetch crosses from one kind to the other.
DIT = DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=4, in_dim=4, out_dim=4, text_dim=32,
                text_len=16, freq_dim=32, rope_max_len=32)
CFG = dataclasses.replace(PRESETS["tiny"], dit=DIT)
BF16 = torch.bfloat16
PREFIX = "model.diffusion_model."   # ComfyUI's single files keep the DiT under it


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def make_dit(seed: int = 0) -> WanDiT:
    """A random DiT with a non-zero head (a fresh one predicts exactly 0)."""
    torch.manual_seed(seed)
    dit = WanDiT(DIT)
    nn.init.normal_(dit.head.head.weight, std=0.02)
    return dit


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, DIT.in_dim, 2, 8, 8, generator=gen), torch.linspace(900.0, 100.0, batch),
            torch.randn(batch, DIT.text_len, DIT.text_dim, generator=gen))


def block_linears(dit: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in dit.blocks.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}


# ---- fp8 weights ----
def test_to_fp8_keeps_fp8_bits_and_quantizes_others_per_row():
    """An e4m3fn weight keeps its bits and file scale; another is quantized per row to within fp8 rounding."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen) * torch.logspace(-3, 0, 32)[:, None]   # rows 1000x apart
    q, scale = to_fp8(w)
    assert q.dtype == FP8 and scale.shape == (32, 1) and q.float().abs().amax(dim=1).eq(448).all()
    # e4m3fn has a 3-bit mantissa: each weight within half a step, 2^-4 of its size (plus subnormals' floor)
    err = (upcast(q, scale, torch.float32) - w).abs()
    assert (err <= 2**-4 * w.abs() + 2**-9 * scale).all()
    kept, file_scale = to_fp8(q, torch.tensor(0.5))
    assert kept is q and torch.equal(file_scale, torch.full((32, 1), 0.5))


def test_fp8_dit_close_to_bf16(tmp_path):
    """The DiT loaded with fp8 block linears is within 3% of the same DiT loaded in bf16 (and in fp32)."""
    save_file(make_dit().state_dict(), str(tmp_path / "dit.safetensors"))
    x, t, context = inputs()
    out = {}
    for dtype in (torch.float32, BF16):
        for fp8 in (False, True):
            dit = load_part("dit", str(tmp_path / "dit.safetensors"), CFG, dtype=dtype, fp8=fp8)
            assert all(type(m) is (FP8Linear if fp8 else nn.Linear) for m in block_linears(dit).values())
            with torch.no_grad():
                out[dtype, fp8] = dit(x.to(dtype), t, context.to(dtype))
    errs = rel_err(out[BF16, True], out[BF16, False]), rel_err(out[torch.float32, True], out[torch.float32, False])
    print(f"relative error of the output: fp8 vs bf16 {errs[0]:.3e}, fp8 (fp32 compute) vs fp32 {errs[1]:.3e}, "
          f"bf16 vs fp32 {rel_err(out[BF16, False], out[torch.float32, False]):.3e}")
    assert max(errs) < 0.03   # measured 1.1e-2 for both (bf16 alone: 2.7e-3)


def test_fp8_backward_keeps_the_fp8_weight_only():
    """An FP8Linear's backward gives dL/dx of the upcast weight but saves no upcast (out, in) copy."""
    layer = FP8Linear.from_linear(nn.Linear(48, 32))
    x = torch.randn(5, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    assert not any(t.shape == (32, 48) and t.dtype != FP8 for t in saved)
    w = upcast(layer.weight, layer.scale, torch.float32).requires_grad_(False)
    x2 = x.detach().requires_grad_(True)
    torch.nn.functional.linear(x2, w, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.weight.grad is None


@pytest.mark.parametrize("order", ["quantize-then-inject", "inject-then-quantize"])
def test_adapter_trains_on_fp8_base(order):
    """Adapters wrap FP8Linear bases (either order): a no-op at init, basis and coeff get gradients, never merged."""
    x, t, context = inputs()
    dit = make_dit()
    if order == "quantize-then-inject":
        quantize_fp8(dit)
        base = dit(x, t, context).detach()
        inject(dit, rank=4)
    else:
        inject(dit, rank=4)
        quantize_fp8(dit)
        base = None
    assert all(type(m.base) is FP8Linear for m in lora_modules(dit).values())
    set_stage(dit, "set", p=0.0)
    dit.train()
    out = dit(x, t, context)
    if base is not None:
        assert torch.equal(out.detach(), base)
    out.square().mean().backward()
    adapters = list(lora_modules(dit).values())
    assert all(m.basis.grad.abs().sum() > 0 for m in adapters)   # basis starts at 0, coeff random: basis learns first
    with torch.no_grad():
        for m in adapters:
            m.basis -= 1e-2 * m.basis.grad.sign()
    dit.zero_grad()
    dit(x, t, context).square().mean().backward()
    assert all(m.coeff.grad.abs().sum() > 0 for m in adapters)
    assert set(trainable_parameters(dit)) == {f"{name}.{p}" for name in lora_modules(dit) for p in ("basis", "coeff")}
    merge(dit)
    assert len(lora_modules(dit)) == 10 * DIT.num_layers   # fp8 bases keep their adapters unmerged


# ---- ComfyUI fp8 files ----
def comfy_fp8_file(path, dit: WanDiT, scaled: bool) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """dit saved as ComfyUI saves an fp8 DiT: block linear weights fp8 (with scale_weight if scaled), the rest bf16."""
    tensors, stored = {}, {}
    for key, value in dit.state_dict().items():
        tensors[PREFIX + key] = value.to(BF16)
    for name, m in block_linears(dit).items():
        key = f"blocks.{name}"
        w = m.weight.detach()
        scale = w.abs().max() / 448 if scaled else torch.tensor(1.0)
        stored[key] = ((w / scale).to(FP8), scale)
        tensors[PREFIX + key + ".weight"] = stored[key][0]
        if scaled:
            tensors[PREFIX + key + ".scale_weight"] = scale.float()            # one value, shape ()
            tensors[PREFIX + key + ".scale_input"] = torch.tensor(1.0)         # ComfyUI's fp8 matmul input scale
    if scaled:
        tensors[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=FP8)          # the marker; its dtype names the format
    save_file(tensors, str(path))
    return str(path), stored


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_comfyui_fp8_files_load(tmp_path, scaled):
    """ComfyUI (scaled) fp8 files load upcast (stored * scale) or as FP8Linear with the same bits; both agree."""
    path, stored = comfy_fp8_file(tmp_path / "dit.safetensors", make_dit(), scaled)
    upcast_dit = load_part("dit", path, CFG, dtype=torch.float32)
    fp8_dit = load_part("dit", path, CFG, dtype=torch.float32, fp8=True)
    for key, (q, scale) in stored.items():
        name = key.removeprefix("blocks.")
        assert torch.equal(upcast_dit.blocks.get_submodule(name).weight, q.float() * scale)
        layer = fp8_dit.blocks.get_submodule(name)
        assert type(layer) is FP8Linear and torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(layer.scale, scale.expand(q.shape[0], 1))
    x, t, context = inputs()
    with torch.no_grad():
        assert torch.equal(fp8_dit(x, t, context), upcast_dit(x, t, context))
        bf16 = load_part("dit", path, CFG, dtype=BF16, fp8=True)   # compute in bf16: biases bf16, fp32 modules fp32
        assert rel_err(bf16(x.to(BF16), t, context.to(BF16)), upcast_dit(x, t, context)) < 0.02
    assert all(m.compute_dtype == BF16 for m in block_linears(bf16).values())


def test_fp8_load_of_a_plain_file_equals_quantize_fp8(tmp_path):
    """load_part(fp8=True) on an fp32 file gives exactly quantize_fp8 of the fp32 model."""
    save_file(make_dit().state_dict(), str(tmp_path / "dit.safetensors"))
    loaded = load_part("dit", str(tmp_path / "dit.safetensors"), CFG, fp8=True)
    reference = load_part("dit", str(tmp_path / "dit.safetensors"), CFG)
    quantize_fp8(reference)
    state, expected = loaded.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k].view(torch.uint8) if state[k].dtype == FP8 else state[k],
                           expected[k].view(torch.uint8) if expected[k].dtype == FP8 else expected[k]) for k in state)
    with pytest.raises(ValueError, match="fp8 storage is for the DiT"):
        load_part("vae", str(tmp_path / "dit.safetensors"), CFG, fp8=True)


@pytest.mark.parametrize("bad", ["shape", "orphan"])
def test_bad_scale_weight_is_refused(tmp_path, bad):
    """A scale_weight that is not one value (or one per row) of a weight in the file raises CheckpointError."""
    path, _ = comfy_fp8_file(tmp_path / "dit.safetensors", make_dit(), scaled=True)
    tensors = load_file(path)
    key = PREFIX + "blocks.0.ffn.0.scale_weight"
    if bad == "shape":
        tensors[key] = torch.ones(3)
    else:
        tensors[PREFIX + "blocks.0.ffn.9.scale_weight"] = tensors.pop(key)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="is not the scale of a weight"):
        load_part("dit", path, CFG)


# ---- block offload and checkpointed activations ----
def train_step(dit: WanDiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One seeded forward / backward of the adapters (DropConnect on): the output and the adapter gradients."""
    x, t, context = inputs()
    torch.manual_seed(1)   # the same DropConnect masks in every run
    out = dit(x, t, context)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in trainable_parameters(dit).items()}


def adapted_dit(fp8: bool, dtype: torch.dtype = torch.float32) -> WanDiT:
    """The training setup: base in dtype (block linears fp8 if asked), fp32 adapters in stage set, checkpointing on."""
    dit = make_dit().to(dtype)
    if fp8:
        quantize_fp8(dit)
    inject(dit, rank=4)
    with torch.no_grad():   # a non-zero delta, so the adapters take part in the output
        for m in lora_modules(dit).values():
            m.basis.normal_(std=0.05)
    set_stage(dit, "set", p=0.5)
    dit.gradient_checkpointing = True
    return dit.train()


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_offload_is_exact(fp8):
    """Offloading the first 2 of 4 blocks leaves output and adapter gradients bit-identical, under checkpointing."""
    dit = adapted_dit(fp8)
    expected_out, expected_grads = train_step(copy.deepcopy(dit))
    homes = {name: p for name, p in dit.blocks[0].named_parameters()}
    offload = offload_blocks(dit, 2, "cpu")
    copied = []
    copy_in = offload.copy_in
    offload.copy_in = lambda i: copied.append(i) or copy_in(i)
    # Each run of block 0, the forward and its recompute in backward, sees copies of the base weights.
    layer = dit.blocks[0].ffn[0]
    runs = []
    layer.register_forward_pre_hook(lambda m, args: runs.append(m.base.weight is homes["ffn.0.base.weight"]))
    out, grads = train_step(dit)
    assert runs == [False, False]
    # One copy per run of an offloaded block, each but the first started during the block before it
    # (forward 0 -> 1, recompute in backward 3 -> 2 -> 1 -> 0): block 0 at once, then 1 while 0 runs,
    # 1 again while 2 recomputes, 0 while 1 does.
    assert copied == [0, 1, 1, 0] and offload.prefetched is None
    assert torch.equal(out, expected_out)
    assert grads.keys() == expected_grads.keys() and all(torch.equal(grads[k], expected_grads[k]) for k in grads)
    # Between calls the offloaded blocks hold their CPU homes again; the adapters never moved.
    assert all(p is homes[name] for name, p in dit.blocks[0].named_parameters())


@pytest.mark.parametrize("dtype, offload", [(None, True), (BF16, False), (BF16, True)],
                         ids=["cpu", "bf16", "bf16-cpu"])
def test_checkpointed_activations_in_bf16_or_on_cpu(dtype, offload):
    """Block inputs kept for backward in bf16 / on the CPU: the same output; gradients exact or within bf16 rounding."""
    dit = adapted_dit(fp8=False)
    expected_out, expected_grads = train_step(copy.deepcopy(dit))
    offload_blocks(dit, 2, "cpu")
    dit.activation_dtype, dit.activation_offload = dtype, offload
    out, grads = train_step(dit)
    assert torch.equal(out, expected_out)   # the forward pass uses x itself; only the recompute starts from the copy
    errs = [rel_err(grads[k], expected_grads[k]) for k in grads]
    print(f"activations {dtype}, offload {offload}: adapter gradients' relative error max {max(errs):.2e}")
    assert max(errs) == 0 if dtype is None else 0 < max(errs) < 2e-2


def test_offload_again_after_inject():
    """train.py's order: offload for the prior samples, remove, inject, offload again: the same training step."""
    dit = make_dit().requires_grad_(False)
    offload = offload_blocks(dit, 2, "cpu")
    x, t, context = inputs()
    with torch.no_grad():
        before = dit(x, t, context)
    offload.remove()
    reference = adapted_dit(fp8=False)             # the same base weights (make_dit's seed)
    inject(dit, rank=4)
    dit.load_state_dict(reference.state_dict())    # and the same adapters
    set_stage(dit, "set", p=0.5)
    dit.gradient_checkpointing = True
    offload_blocks(dit.train(), 2, "cpu")
    expected_out, expected_grads = train_step(reference)
    out, grads = train_step(dit)
    assert torch.equal(before, make_dit()(x, t, context).detach())
    assert torch.equal(out, expected_out) and all(torch.equal(grads[k], expected_grads[k]) for k in grads)


def test_offload_refuses_trainable_base_weights():
    """offload_blocks raises for a trainable base weight: the optimizer would update a copy."""
    with pytest.raises(ValueError, match="trainable"):
        offload_blocks(make_dit(), 1, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_offload_on_cuda_is_exact(fp8):
    """On CUDA (pinned CPU weights, side-stream prefetch): the output and adapter gradients of the on-device run."""
    dit = adapted_dit(fp8, BF16)
    reference = copy.deepcopy(dit).cuda()
    expected_out, expected_grads = train_step_cuda(reference)
    offload_blocks(dit, 3, "cuda")
    assert dit.blocks[0].ffn[0].base.weight.is_pinned() and dit.blocks[3].ffn[0].base.weight.is_cuda
    out, grads = train_step_cuda(dit)
    assert torch.equal(out, expected_out)
    # Not bit-exact: CUDA attention backward kernels may sum in a different order from run to run.
    assert max(rel_err(grads[k], expected_grads[k]) for k in grads) < 1e-3
    dit.activation_dtype, dit.activation_offload = BF16, True
    out, grads = train_step_cuda(dit)
    assert torch.equal(out, expected_out)
    assert max(rel_err(grads[k], expected_grads[k]) for k in grads) < 2e-2


def train_step_cuda(dit: WanDiT) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, context = (v.cuda() for v in inputs())
    for p in trainable_parameters(dit).values():
        p.grad = None
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=BF16):
        out = dit(x.to(BF16), t, context.to(BF16))
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in trainable_parameters(dit).items()}
