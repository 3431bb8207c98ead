"""Side-by-side speed and memory of this implementation and the diffusers / transformers reference.

    python bench.py                                                        # CPU: tiny and toy presets
    python bench.py --config wan2.1-t2v-1.3b --device cuda --dtype bf16    # GPU: 480x832, 81 and 49 frames
    python bench.py --plan --write-docs                                    # memory planner, no GPU needed

One process builds our DiT, VAE and umT5 with random weights, writes them with model/save.py
save_diffusers, and loads that folder twice: with model/loader.py and as a diffusers WanPipeline. Both
sides then do the same work on the same inputs: a DiT forward; a DiT forward+backward with a rank-8 LoRA
on every block linear, base frozen (ours lora/lora.py, reference peft); a VAE encode and decode; a full
sampling run (text, N UniPC steps with CFG on the same sigmas and noise, decode); one Set-and-Sequence
training step per stage (forward, MSE, backward, clipping, AdamW). The last column, the largest output
difference, shows it is the same work (not for training steps: peft has no DropConnect).

Times: one warm-up rep, then the median of --reps, ours and the reference alternating so that background
load hits both alike. Peak memory is what a step needs beyond the loaded weights: on a GPU
torch.cuda.max_memory_allocated; on the CPU, which has no such counter, the peak of the bytes held by
tensors created during the step, tracked in one extra untimed rep (allocator caches and kernels' private
scratch are not seen). FLOPs are counted analytically for the DiT alone (2 x multiply-adds of linears and
attention matmuls); activation recomputation by gradient checkpointing is not counted (model FLOPs).
The reference side needs diffusers, transformers, peft and accelerate (requirements-dev.txt); they
are imported only when a benchmark runs, so a missing one is a one-line error, not a traceback.
Tables of past runs: docs/performance.md.

--plan needs no GPU and no reference library: for the 1.3B and 14B at 480x832 it prints the device
memory of one training micro-step (batch 1) per weight format (bf16, fp8), gradient checkpointing and
number of blocks offloaded to the CPU: resident weights, adapter + AdamW state, and the activations,
measured by running our DiT's forward and backward on fake tensors (FakeTensorMode: shapes, no data).
Shapes: B batch, C latent channels, F H W latent frames/height/width, L video tokens, S text tokens, D width.
"""
import argparse
import dataclasses
import importlib
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F

from lora.lora import inject, lora_modules, set_stage, trainable_parameters
from lora.memory import HEADROOM, PLAN_FRAMES, PLAN_PRESETS, RANK, format_plan, peak_memory, plan_rows
from model.config import PRESETS
from model.dit import WanDiT, dit_flops
from model.files import atomic_path, write_section
from model.flow import add_noise, flow_matching_loss, sample_train_sigmas, unipc_sigmas, velocity_target
from model.keymaps import DIT_KEYS
from model.loader import DTYPES, WanModels, load_wan
from model.pipeline import generate_latents
from model.save import save_diffusers
from model.text_encoder import Tokenizer, UMT5Encoder, encode_prompts
from model.vae import WanVAE

PROMPT = "a red fox runs along a snowy river bank at dawn"
TRAIN_LR, TRAIN_CLIP = 1e-4, 0.05   # train.py's --lr and --clip defaults
REFERENCE_LIBRARIES = ("diffusers", "transformers", "peft", "accelerate")   # requirements-dev.txt


def check_reference_libraries() -> None:
    """Exit with one line naming the install command if a reference library is missing."""
    for name in REFERENCE_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.exit(f"bench.py: error: {name} is not installed (the reference side): "
                     "pip install -r requirements-dev.txt")


# ---- peak memory and timing ----
def sync(device: torch.device) -> None:
    if device.type == "cuda":   # CUDA work is asynchronous: wait for it before reading a clock or counter
        torch.cuda.synchronize()


def measure(fns: dict, args, device: torch.device, compare: bool = True) -> dict:
    """Warm up and check each side, one memory rep each, then alternate the timed reps."""
    outs, result = {}, {"diff": None}
    for side, fn in fns.items():
        try:
            for _ in range(2 if args.compile else 1):   # a compiled DiT recompiles once its RoPE cache is filled
                outs[side] = fn()   # warm-up: compiles, fills caches, creates the optimizer state
            cpu_compiled = args.compile and side == "ours" and device.type == "cpu"  # dynamo vs dispatch mode
            result[f"mem_{side}"] = None if cpu_compiled else peak_memory(fn, device)
        except torch.OutOfMemoryError:   # reported in the table; the other side still runs
            outs[side] = result[f"mem_{side}"] = "OOM"
    live = [side for side in fns if outs[side] != "OOM"]
    if len(live) < len(fns):
        torch.cuda.empty_cache()         # after the except block, which held the failed step's tensors
    times = {side: [] for side in live}
    for _ in range(args.reps):
        for side in live:
            sync(device)
            start = time.perf_counter()
            fns[side]()
            sync(device)
            times[side].append(time.perf_counter() - start)
    for side in fns:
        result[side] = statistics.median(times[side]) if side in live else "OOM"
    if compare and len(live) == 2:
        result["diff"] = (outs["ours"].float() - outs["ref"].float()).abs().max().item()
    return result


# ---- building both sides from one random checkpoint ----
def make_tokenizer(folder: str, text_len: int) -> Tokenizer:
    """A 64-piece sentencepiece model in the T5 layout (pad 0, eos 1, unk 2): a tokenizer, not a good one."""
    rng = random.Random(0)
    syllables = "ka ri to me na su lo pe de va mi zu".split()
    words = PROMPT.split() + ["".join(rng.choice(syllables) for _ in range(3)) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)]
    os.makedirs(folder)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=os.path.join(folder, "spiece"),
                                   vocab_size=64, model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    return Tokenizer(folder, text_len)   # + T5's 100 sentinels: 164 ids, within every preset's vocab


def bench_config(name: str, args):
    """The preset with the --layers / --skip-text changes; returns (config, a readable label)."""
    cfg = PRESETS[name]
    if args.layers:
        cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_layers=args.layers))
    if args.skip_text:
        # A 0-layer umT5 of the same width stands in (the real one is 11 GB in bf16); the sampling rows
        # then take random text states, so they time the DiT and the VAE only.
        cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, num_layers=0, vocab_size=256))
    return cfg, name + (f" ({cfg.dit.num_layers} layers)" if args.layers else "")


def build(cfg, folder: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Our models and a diffusers WanPipeline, each loaded by its own library from one random checkpoint."""
    import diffusers
    import transformers
    from diffusers import UniPCMultistepScheduler, WanPipeline
    for library in (diffusers, transformers):   # no loading bars between the table rows
        library.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer = make_tokenizer(os.path.join(folder, "spiece"), cfg.t5.text_len)
    with torch.device(device):   # random init where the work happens (fast for umT5-XXL on a GPU)
        dit, vae, text = WanDiT(cfg.dit), WanVAE(cfg.vae), UMT5Encoder(cfg.t5)
    # Wan zero-initializes the output layer: a zero velocity would make every comparison trivially equal.
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)
    save_diffusers(os.path.join(folder, "wan"), WanModels(cfg, "bench", dit, vae, text, tokenizer), dtype=dtype)
    del dit, vae, text
    ours = load_wan(os.path.join(folder, "wan"), device=device, dtype=dtype)
    pipe = WanPipeline.from_pretrained(os.path.join(folder, "wan"), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    # Our sampler's grid (already shifted, starting at 0.999) for diffusers' UniPC: the pipeline only passes
    # a step count to set_timesteps, so that call gets the sigmas added (flow_shift 1: no second shift).
    scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=1.0)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda steps, device=None: set_timesteps(
        device=device, sigmas=np.array(unipc_sigmas(steps, cfg.sample_shift)[:-1].numpy()))
    pipe.scheduler = scheduler
    return ours, pipe


def add_peft_lora(transformer, ours_dit) -> None:
    """peft LoRA of the same rank on the same layers, starting from our adapters' values (lora_A = coeff)."""
    from peft import LoraConfig
    adapters = lora_modules(ours_dit)
    names = {ours: DIT_KEYS.to_reference(ours + ".weight").removesuffix(".weight") for ours in adapters}
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=list(names.values())))
    with torch.no_grad():
        for ours, ref in names.items():
            layer = transformer.get_submodule(ref)
            layer.lora_A["default"].weight.copy_(adapters[ours].coeff)
            layer.lora_B["default"].weight.copy_(adapters[ours].basis)


# ---- the measurements of one preset at one clip size ----
def run_config(name: str, frames: int, height: int, width: int, args, device, dtype, first: bool) -> list[dict]:
    """Every row for one clip size; the stage-set training rows (single frames) only for the first size."""
    cfg, label = bench_config(name, args)
    S, text_dim, vae = cfg.dit.text_len, cfg.dit.text_dim, cfg.vae
    latent = (cfg.dit.in_dim, (frames - 1) // vae.temporal_factor + 1,
              height // vae.spatial_factor, width // vae.spatial_factor)           # (C, F, H, W)
    tokens = math.prod(n // p for n, p in zip(latent[1:], cfg.dit.patch_size))     # L
    label = f"{label} {args.dtype} {frames}f {height}x{width} L={tokens}"
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    gen = torch.Generator().manual_seed(args.seed)      # CPU generator: the same inputs on any device
    rows = []

    def add(measurement: str, fns: dict, flops: float | None, compare: bool = True) -> None:
        rows.append({"config": label, "measurement": measurement, "flops": flops,
                     **measure(fns, args, device, compare)})
        print(format_row(rows[-1], args), flush=True)

    def dit_calls(x, t, context) -> dict:
        """Both DiTs on the same inputs: ours under autocast as train.py / sample.py run it, diffusers as is."""
        def ours_call():
            with autocast:
                return dit(x, t, context)       # `dit` is looked up at call time: it may be recompiled
        return {"ours": ours_call, "ref": lambda: ref(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                                      return_dict=False)[0]}

    with tempfile.TemporaryDirectory() as folder:
        ours, pipe = build(cfg, folder, device, dtype, args.seed)
    dit, ref = torch.compile(ours.dit) if args.compile else ours.dit, pipe.transformer

    # 1. DiT forward, no grad, batch 1; the text rows after the first quarter are Wan's zero padding.
    x = torch.randn(1, *latent, generator=gen).to(device, dtype)
    t = torch.full((1,), 500.0, device=device)
    context = torch.randn(1, S, text_dim, generator=gen) * (torch.arange(S) < S // 4)[:, None]
    context = context.to(device, dtype)
    with torch.no_grad():
        add("DiT forward", dit_calls(x, t, context), dit_flops(cfg.dit, 1, tokens))

    # 2. VAE encode and decode of one clip (the reference normalizes latents outside its VAE).
    video = (torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1).to(device, dtype)
    z = torch.randn(1, *latent, generator=gen).to(device, dtype)
    mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1, 1) for v in (vae.latents_mean, vae.latents_std))
    with torch.no_grad():
        add("VAE encode", {"ours": lambda: ours.vae.encode(video),
                           "ref": lambda: (pipe.vae.encode(video).latent_dist.mean - mean) / std}, None)
        add("VAE decode", {"ours": lambda: ours.vae.decode(z),
                           "ref": lambda: pipe.vae.decode((z * std + mean).to(dtype)).sample}, None)

    # 3. Sampling: text encoding, N UniPC steps with CFG (2 DiT passes each), decoding; same noise.
    steps, guidance, shift = args.steps, cfg.guidance_scale, cfg.sample_shift
    texts = torch.randn(2, S, text_dim, generator=gen).to(device, dtype) if args.skip_text else None
    initial = torch.randn(1, *latent, generator=torch.Generator().manual_seed(args.seed + 1))  # noise (1, C, F, H, W)

    def ours_sample():
        states = texts if texts is not None else encode_prompts(ours.tokenizer, ours.text_encoder,
                                                                [PROMPT, cfg.negative_prompt], device)
        latents = generate_latents(dit, states[:1], states[1:], initial, "unipc", steps, shift, guidance,
                                   progress=False)
        return ours.vae.decode(latents.to(device, dtype))                       # (1, 3, T, H, W) in [-1, 1]

    def ref_sample():
        text = ({"prompt": PROMPT, "negative_prompt": cfg.negative_prompt} if texts is None else
                {"prompt_embeds": texts[:1], "negative_prompt_embeds": texts[1:]})
        video = pipe(**text, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                     guidance_scale=guidance, latents=initial.to(device), max_sequence_length=cfg.t5.text_len,
                     output_type="pt").frames                                   # (1, T, 3, H, W) in [0, 1]
        return video.transpose(1, 2) * 2 - 1
    what = "DiT+VAE, given text states" if args.skip_text else "text+DiT+VAE"
    with torch.no_grad():
        add(f"sampling, {steps} UniPC steps, CFG ({what})", {"ours": ours_sample, "ref": ref_sample},
            steps * dit_flops(cfg.dit, 2, tokens))
    ours.text_encoder = pipe.text_encoder = None          # umT5-XXL is 11 GB: free it before training

    # 4. LoRA on every block linear of both DiTs, base frozen; a non-zero adapter, the same on both sides.
    inject(ours.dit, rank=RANK)
    with torch.no_grad():
        for m in lora_modules(ours.dit).values():
            m.basis.normal_(std=0.02)
    add_peft_lora(ref, ours.dit)
    dit = torch.compile(ours.dit) if args.compile else ours.dit
    ours.dit.train()
    ref.train()

    def train_only(stage: str, p: float | None = None) -> dict:
        """Both sides train the same tensors: set = basis + coeff (peft lora_B + lora_A), sequence = the
        residual (peft: lora_A, the coeff side); returns them per side."""
        set_stage(ours.dit, stage, p)                     # also sets our DropConnect p (None: the stage's)
        for key, param in ref.named_parameters():
            param.requires_grad_("lora_A" in key or ("lora_B" in key and stage == "set"))
        return {"ours": list(trainable_parameters(ours.dit).values()),
                "ref": [param for param in ref.parameters() if param.requires_grad]}

    def fwd_bwd(call, params):
        def step():
            out = call()
            out.float().pow(2).mean().backward()
            for param in params:
                param.grad = None
            return out.detach()
        return step

    def train_step(loss_of, params):
        """train.py's step: loss, backward, gradient clipping, AdamW."""
        optimizer = torch.optim.AdamW(params, lr=TRAIN_LR, betas=(0.9, 0.99), weight_decay=0.01)

        def step():
            loss = loss_of()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, TRAIN_CLIP)
            optimizer.step()
        return step

    def use_ckpt(ckpt: bool) -> str:
        ours.dit.gradient_checkpointing = ckpt
        (ref.enable_gradient_checkpointing if ckpt else ref.disable_gradient_checkpointing)()
        return ", grad ckpt" if ckpt else ""

    # The forward+backward rows come first, while both adapters still hold the same values.
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[
        args.grad_ckpt or ("both" if device.type == "cuda" else "off")]
    for ckpt in ckpts:
        suffix = use_ckpt(ckpt)
        params = train_only("set", p=0.0)                 # a plain LoRA: no DropConnect, like peft
        calls = dit_calls(x, t, context)
        add(f"DiT fwd+bwd, LoRA r{RANK}{suffix}", {side: fwd_bwd(calls[side], params[side]) for side in calls},
            dit_flops(cfg.dit, 1, tokens, RANK, backward=True))

    # 5. One Set-and-Sequence training step per stage, as train.py's loop does it (with our DropConnect).
    batch = args.train_batch
    for ckpt in ckpts:
        suffix = use_ckpt(ckpt)
        for stage in ("set", "sequence") if first else ("sequence",):
            params = train_only(stage)
            shape = (batch, latent[0], 1, *latent[2:]) if stage == "set" else (batch, *latent)  # set: frames
            x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
            sigmas = sample_train_sigmas(batch, gen, shift=shift, mode="uniform")
            text = torch.randn(batch, S, text_dim, generator=gen)
            text = text * (torch.rand(batch, S, 1, generator=gen) >= 0.1)          # train.py's text masking
            x0, noise, sigmas, text = (v.to(device) for v in (x0, noise, sigmas, text))
            ref_call = dit_calls(add_noise(x0, noise, sigmas).to(dtype), sigmas * 1000, text.to(dtype))["ref"]

            def ours_loss():            # train.py's loss function, under train.py's autocast
                with autocast:
                    return flow_matching_loss(dit, x0, noise, sigmas, text.to(dtype)).mean()
            losses = {"ours": ours_loss, "ref": lambda: F.mse_loss(ref_call().float(), velocity_target(x0, noise))}
            step_tokens = tokens if stage == "sequence" else tokens // latent[1]
            add(f"train step, stage {stage}, B={batch}{suffix}",
                {side: train_step(losses[side], params[side]) for side in losses},
                dit_flops(cfg.dit, batch, step_tokens, RANK, backward=True), compare=False)
    return rows


# ---- the table ----
COLUMNS = ["config", "measurement", "ours s", "ref s", "ours/ref", "peak MiB ours", "peak MiB ref",
           "DiT GFLOP", "TFLOP/s ours / ref", "% of peak ours / ref", "max abs diff"]


def format_row(row: dict, args) -> str:
    """One markdown row; "OOM" where a side ran out of memory, "—" where nothing was measured."""
    ours, ref, flops = row["ours"], row["ref"], row["flops"]
    ok = [not isinstance(v, str) for v in (ours, ref)]
    rates = [flops / s if flops and good else None for s, good in zip((ours, ref), ok)]
    gpu = args.device.startswith("cuda")
    cells = [row["config"], row["measurement"], *(f"{v:.4f}" if good else v for v, good in zip((ours, ref), ok)),
             f"{ours / ref:.2f}" if all(ok) else "—",
             *("—" if m is None else m if isinstance(m, str) else f"{m / 2**20:.3g}"
               for m in (row["mem_ours"], row["mem_ref"])),
             f"{flops / 1e9:.3g}" if flops else "—",
             " / ".join(f"{r / 1e12:.3g}" if r else "—" for r in rates),
             " / ".join(f"{100 * r / (args.peak_tflops * 1e12):.1f}" if r and gpu else "—" for r in rates),
             "—" if row["diff"] is None else f"{row['diff']:.1e}"]
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict], args) -> str:
    head = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(head + [format_row(row, args) for row in rows])


# ---- the memory planner (--plan): what one training micro-step needs on the device (lora/memory.py) ----
def plan_main(args: argparse.Namespace) -> tuple[list[dict], str]:
    start = time.perf_counter()
    offloads = [None if n == "all" else int(n) for n in args.offload]
    rows = plan_rows(args.config or PLAN_PRESETS, args.frames or PLAN_FRAMES, args.height, args.width, args.stage,
                     offloads, args.plan_full_depth)
    table = (f"Per micro-step, batch 1, stage {args.stage}, rank-{RANK} adapter on every block linear, bf16 compute; "
             f"fits: total <= {HEADROOM:.0%} of the card.\n\n" + format_plan(rows))
    print(table)
    print(f"\n--plan took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.write_docs:
        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "performance.md"), table,
                      "<!-- plan:begin -->", "<!-- plan:end -->")
    return rows, table


def main(args: argparse.Namespace) -> tuple[list[dict], str]:
    if args.plan:
        return plan_main(args)
    check_reference_libraries()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    if args.reps < 1 or args.steps < 1 or args.train_batch < 1:
        raise ValueError("--reps, --steps and --train-batch must be >= 1")
    rows = []
    for name in args.config or (["wan2.1-t2v-1.3b"] if device.type == "cuda" else ["tiny", "toy"]):
        cfg = PRESETS[name]
        real = name.startswith("wan")   # the real presets: the 81- and 49-frame clips at 480x832
        for i, frames in enumerate(args.frames or ([81, 49] if real else [cfg.num_frames])):
            rows += run_config(name, frames, args.height or cfg.height, args.width or cfg.width, args,
                               device, dtype, first=i == 0)
            if device.type == "cuda":
                torch.cuda.empty_cache()   # this size's models are gone: hand their cached blocks back
    threads = torch.get_num_threads()
    table = (f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} threads'}), "
             f"torch {torch.__version__}, median of {args.reps} reps; times in seconds\n\n" + format_table(rows, args))
    print("\n" + table)
    if args.out:
        with atomic_path(args.out) as tmp, open(tmp, "w") as f:
            f.write(table + "\n")
    return rows, table


def blocks_count(text: str) -> str:
    """--offload's type: a number of blocks or 'all' (argparse names this function in its error)."""
    return text if text == "all" else str(int(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what to measure
    p.add_argument("--config", action="append", choices=tuple(PRESETS),
                   help="preset to measure; repeat for several (default: tiny and toy on CPU, 1.3B on GPU)")
    p.add_argument("--layers", type=int, help="override the DiT's number of blocks (e.g. a 2-block 1.3B on CPU)")
    p.add_argument("--skip-text", action="store_true",
                   help="replace umT5 by a 0-layer stand-in; sampling then times DiT + VAE on given text states")
    p.add_argument("--frames", type=int, nargs="+", help="frames, 4k+1 (default: the preset's; 81 49 for 1.3B/14B)")
    p.add_argument("--height", type=int, help="height in pixels (default: the preset's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the preset's)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps of the sampling run")
    p.add_argument("--train-batch", type=int, default=10,
                   help="samples per training step (default: train.py's --batch 8 + --prior-batch 2)")
    # how
    p.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up; the median is shown")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="weight dtype (default: bf16 on GPUs, else fp32)")
    p.add_argument("--grad-ckpt", choices=("off", "on", "both"),
                   help="gradient checkpointing in the training rows (default: off on CPU, both on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile our DiT (the reference stays eager)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    # output
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak for %% of peak (H100 SXM)")
    p.add_argument("--out", help="also write the table to this markdown file")
    # the memory planner
    p.add_argument("--plan", action="store_true",
                   help="instead of benchmarking, print the device memory of a training micro-step per setting "
                        "(default: 1.3B and 14B at 480x832, 33 49 81 frames)")
    p.add_argument("--stage", choices=("set", "sequence"), default="sequence",
                   help="--plan: the stage whose tensors train (sequence: the clip stage)")
    p.add_argument("--offload", nargs="+", default=["0", "all"], type=blocks_count,
                   help="--plan: numbers of DiT blocks kept on the CPU and streamed in; 'all' = every block")
    p.add_argument("--plan-full-depth", action="store_true",
                   help="--plan: run every block, not 2- and 3-block models extrapolated (same bytes, slower)")
    p.add_argument("--write-docs", action="store_true", help="--plan: also write the table into docs/performance.md")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
