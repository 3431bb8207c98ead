"""bench.py --plan: the memory planner's fake-tensor counts equal what a real CPU training step allocates."""
import ctypes
import ctypes.util
import dataclasses
import resource

import pytest
import torch

import bench
from lora import memory
from torch._subclasses.fake_tensor import FakeTensorMode
from lora.lora import trainable_parameters
from model.config import PRESETS
from model.files import write_section

BF16 = torch.bfloat16


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_fake_activations_match_a_real_cpu_step(grad_ckpt, one_thread):
    """Fake-tensor held and peak bytes, from 2 and 3 blocks, equal a real 4-block bf16 CPU step's within 5%."""
    cfg = dataclasses.replace(bench.PRESETS["tiny"].dit, num_layers=4)
    latent = (cfg.in_dim, 3, 8, 8)                                     # (C, F, H, W): 3 x 4 x 4 = 48 tokens
    planned = memory.measure_activations(cfg, latent, BF16, grad_ckpt, "sequence")
    full = memory.measure_activations(cfg, latent, BF16, grad_ckpt, "sequence", full_depth=True)
    real = memory.step_activations(memory.plan_model(cfg, BF16, "sequence"), latent, BF16, grad_ckpt)
    assert planned == full                                             # the extrapolation is exact
    for key in ("held", "peak"):
        assert real[key] > 0 and abs(planned[key] / real[key] - 1) < 0.05, (key, planned, real)


def test_held_bytes_are_the_tensors_saved_for_backward():
    """Without checkpointing, what a 2-block 1.3B forward leaves alive is what autograd saved, plus the inputs."""
    cfg = dataclasses.replace(bench.PRESETS["wan2.1-t2v-1.3b"].dit, num_layers=2)
    saved = {}                                  # storage -> bytes: views of one storage count once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with FakeTensorMode():
        model = memory.plan_model(cfg, BF16, "sequence")
        weights = {p.untyped_storage()._cdata for p in model.parameters()}   # a linear saves its weight
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            acts = memory.step_activations(model, (cfg.in_dim, 1, 60, 104), BF16, grad_ckpt=False)
    activations = sum(n for key, n in saved.items() if key not in weights)
    # Also alive: x0 and noise (fp32), the bf16 text states (the DiT saves its padded copy) and RoPE's cos/sin cache.
    L = 1560
    inputs = 2 * cfg.in_dim * L * 4 * 4 + cfg.text_len * cfg.text_dim * 2 + 2 * L * cfg.head_dim // 2 * 4
    assert activations <= acts["held"] <= activations + inputs


def test_weight_and_adapter_bytes():
    """bf16 keeps load_wan's fp32 modules; fp8 halves the block linears; offloading keeps two blocks resident."""
    cfg = bench.PRESETS["wan2.1-t2v-1.3b"].dit
    model = memory.plan_model(cfg, BF16, "sequence", device="meta")
    params = dict(model.named_parameters())
    frozen = {n: p for n, p in params.items() if not n.endswith(memory.ADAPTER_TENSORS)}
    assert memory.weight_bytes(model, fp8=False, offload=0) == sum(p.nbytes for p in frozen.values())
    assert params["blocks.0.ffn.0.base.weight"].dtype == BF16 and params["blocks.0.modulation"].dtype == torch.float32
    linears = sum(p.numel() for n, p in frozen.items() if n.startswith("blocks.") and n.endswith("base.weight"))
    assert memory.weight_bytes(model, fp8=True, offload=0) == memory.weight_bytes(model, False, 0) - linears
    block = sum(p.nbytes for n, p in frozen.items() if n.startswith("blocks.0."))
    assert memory.weight_bytes(model, False, cfg.num_layers) == memory.weight_bytes(model, False, 0) - 28 * block
    # Stage sequence: all three adapter tensors resident, the residual also with a grad and two AdamW moments.
    adapters = [p for n, p in params.items() if n.endswith(memory.ADAPTER_TENSORS)]
    residuals = sum(p.nbytes for n, p in params.items() if n.endswith("residual"))
    assert memory.adapter_bytes(model) == sum(p.nbytes for p in adapters) + 3 * residuals


def test_plan_table_and_docs(tmp_path, one_thread):
    """--plan prints one row per frames x ckpt x weights x offload; the docs block is replaced, or appended once."""
    args = bench.parse_args(["--plan", "--config", "tiny", "--frames", "9", "--offload", "0", "all"])
    rows, table = bench.main(args)
    assert len(rows) == 2 * 2 * 2 and table.count("\n| tiny | 9 (12) |") == 8
    for row in rows:
        assert row["total"] == row["weights"] + row["adapter"] + row["activations"]
    off, on = (next(r for r in rows if r["ckpt"] == ckpt) for ckpt in (False, True))
    assert on["held"] < off["held"]                                    # checkpointing keeps only block inputs
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n<!-- plan:begin -->\nold\n<!-- plan:end -->\nrest\n")
    write_section(str(doc), "first", "<!-- plan:begin -->", "<!-- plan:end -->")
    write_section(str(doc), "second", "<!-- plan:begin -->", "<!-- plan:end -->")
    assert doc.read_text() == "# Performance\n<!-- plan:begin -->\nsecond\n<!-- plan:end -->\nrest\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="marker"):
        write_section(str(doc), "x", "<!-- plan:begin -->", "<!-- plan:end -->")


def rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fix_mmap_threshold() -> None:
    """Make glibc hand every freed block of >= 128 KiB straight back to the OS, so RSS follows live tensors."""
    # By default glibc raises its mmap threshold after large frees and then keeps freed heap memory:
    # RSS would show that retention (+0.4 GiB on a 4-block 1.3B step, +1.6 GiB on the 30-block one).
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(-3, 128 * 1024)   # M_MMAP_THRESHOLD; setting it also turns the dynamic threshold off


@pytest.mark.slow
def test_plan_predicts_a_real_13b_training_step(one_thread):
    """The planned total of a 1.3B micro-step (1 frame at 480x832, ckpt on, bf16) is within 15% of a real one."""
    cfg = bench.PRESETS["wan2.1-t2v-1.3b"].dit
    latent = (cfg.in_dim, 1, 60, 104)                                  # 1 latent frame: L = 1560 tokens
    shapes = memory.plan_model(cfg, BF16, "sequence", device="meta")
    acts = memory.measure_activations(cfg, latent, BF16, True, "sequence")
    planned = memory.weight_bytes(shapes, fp8=False, offload=0) + memory.adapter_bytes(shapes) + acts["peak"]

    fix_mmap_threshold()
    rss_before, maxrss_before = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with memory.LiveTensorBytes() as tracker:                           # every tensor byte the step allocates
        model = memory.plan_model(cfg, BF16, "sequence")                # real random weights on the CPU
        params = list(trainable_parameters(model).values())
        optimizer = torch.optim.AdamW(params, lr=bench.TRAIN_LR, betas=(0.9, 0.99), weight_decay=0.01)
        real = memory.step_activations(model, latent, BF16, grad_ckpt=True)
        torch.nn.utils.clip_grad_norm_(params, bench.TRAIN_CLIP)
        optimizer.step()                                               # creates the two AdamW moments
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_peak = maxrss - rss_before
    print(f"\n1.3B 1f 480x832 ckpt bf16: planned {planned / 2**30:.3f} GiB (activations {acts['peak'] / 2**30:.3f}); "
          f"real tensors {tracker.peak / 2**30:.3f} GiB (activations {real['peak'] / 2**30:.3f}); "
          f"RSS peak {rss_peak / 2**30:.3f} GiB")
    assert abs(real["peak"] / acts["peak"] - 1) < 0.05
    assert abs(tracker.peak / planned - 1) < 0.15
    if maxrss > maxrss_before:    # else an earlier test of this process peaked higher: RSS says nothing here
        assert abs(rss_peak / planned - 1) < 0.15


def test_sharded_weights_are_a_share_of_the_frozen_linears():
    """--shard-base over N ranks keeps 1/N of the frozen block linears (plus one gathered), the rest whole."""
    model = memory.plan_model(PRESETS["tiny"].dit, torch.bfloat16, "set", device="meta")
    whole, two, four = (memory.weight_bytes(model, False, 0, shard) for shard in (1, 2, 4))
    linears = sum(p.nbytes for name, p in model.named_parameters()
                  if name.startswith("blocks.") and name.endswith("base.weight"))
    assert whole > two > four > whole - linears
