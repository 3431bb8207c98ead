"""bench.py runs end to end on the tiny preset: every row, positive times, the same outputs on both sides."""
import torch

import bench
from lora.memory import LiveTensorBytes


def test_bench_tiny_table(tmp_path, one_thread):
    """One rep on the tiny preset: every measurement row, positive times and memory, equal outputs, the file."""
    out = tmp_path / "bench.md"
    args = bench.parse_args(["--config", "tiny", "--reps", "1", "--steps", "2", "--train-batch", "2",
                             "--out", str(out)])
    rows, table = bench.main(args)
    expected = ["DiT forward", "VAE encode", "VAE decode", "sampling, 2 UniPC steps, CFG (text+DiT+VAE)",
                "DiT fwd+bwd, LoRA r8", "train step, stage set, B=2", "train step, stage sequence, B=2"]
    assert [row["measurement"] for row in rows] == expected
    for row in rows:
        assert row["ours"] > 0 and row["ref"] > 0, row
        assert row["mem_ours"] > 0 and row["mem_ref"] > 0, row
        # Same weights and inputs, so the same outputs (a training step differs by our DropConnect masks).
        assert row["diff"] is None if row["measurement"].startswith("train") else row["diff"] < 1e-4, row
    assert out.read_text().strip() == table.strip()
    assert table.count("\n| tiny fp32 9f 32x32 L=12 |") == len(expected)


def test_dit_flops_counts_linears_and_attention():
    """dit_flops = 2 x multiply-adds of every block's linears and attention matmuls plus the outer layers."""
    cfg = bench.PRESETS["tiny"].dit
    L, S, D, F = 12, cfg.text_len, cfg.dim, cfg.ffn_dim
    block = L * (6 * D * D + 2 * D * F) + S * 2 * D * D + 2 * L * L * D + 2 * L * S * D
    outer = S * (cfg.text_dim * D + D * D) + L * D * 4 * (cfg.in_dim + cfg.out_dim)
    assert bench.dit_flops(cfg, 3, L) == 2 * 3 * (cfg.num_layers * block + outer)
    assert bench.dit_flops(cfg, 1, L, lora_rank=8, backward=True) > 2 * bench.dit_flops(cfg, 1, L)


def test_live_tensor_bytes_counts_new_storages_only():
    """The CPU peak counts tensors created inside (not views of old ones) and drops them when freed."""
    weight = torch.randn(256, 256)
    with LiveTensorBytes() as tracker:
        view = weight.t()                      # a view: no new memory
        y = weight @ weight                    # 256 KiB
        del y
        z = torch.ones(128, 256)               # 128 KiB, after y was freed
    assert view.data_ptr() == weight.data_ptr() and z.numel() == 128 * 256
    assert tracker.peak == 256 * 256 * 4 and tracker.live == 128 * 256 * 4
