"""Checkpoint loading for Wan2.1 T2V: diffusers folders, the original release and ComfyUI single files
in, our modules out (model/save.py writes diffusers folders).

Loading (STYLE.md principle 10): build each module on the meta device, read only the checkpoint's key
names and shapes, check the full key set and every shape, and only then read the tensors and
load_state_dict(strict=True, assign=True). A bad checkpoint raises CheckpointError naming the file,
the offending keys and the likely fix before any tensor is read: no half-loaded model is returned.

model/checkpoint.py finds a folder's layout, weight files and config; model/keymaps.py maps the
reference libraries' key names to ours. A file may use our names or the reference's: each is read in
whichever explains more of its keys. Single files may hold their keys under one of
keymaps.SINGLE_FILE_PREFIXES (ComfyUI's whole-model files). ComfyUI's fp8 files load too: their fp8
weights are upcast to the requested dtype, or kept in fp8 with fp8=True (model/fp8.py).
"""
import dataclasses
import hashlib
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from model.checkpoint import CheckpointError, config_from_dit_shapes, listing, read_folder, read_json
from model.config import PRESETS, WanConfig
from model.dit import WanDiT
from model.fp8 import FP8Linear, quantize_fp8, to_fp8
from model.keymaps import SINGLE_FILE_PREFIXES, part_keys
from model.text_encoder import Tokenizer, UMT5Encoder
from model.vae import WanVAE


# The --dtype flag of the scripts: the storage / autocast dtype of the DiT's linears and of the umT5.
# No fp16: Wan is trained and run in bf16, and fp16's range overflows in T5 encoders (transformers
# keeps T5's `wo` in fp32 for that). fp16 checkpoint files still load, cast on load.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PART_NAMES = {"dit": "DiT", "vae": "VAE", "text": "umT5 text encoder"}   # load_wan's parts=, as errors name them


# ---- reading weight files ----
def _strip_prefix(keys: list[str], part: str) -> dict[str, str]:
    """{key as our loader sees it: key stored in the file}."""
    for prefix in SINGLE_FILE_PREFIXES[part]:
        if any(key.startswith(prefix) for key in keys):
            other_parts = tuple(p for prefixes in SINGLE_FILE_PREFIXES.values() for p in prefixes)
            stray = {key: key for key in keys if not key.startswith(other_parts)}  # reported as unexpected
            return stray | {key[len(prefix):]: key for key in keys if key.startswith(prefix)}
    return {key: key for key in keys}


# ComfyUI's scaled-fp8 files: a `scaled_fp8` tensor marks the file (its dtype names the fp8 format); each
# scaled layer stores its weight in fp8 and its scale beside it, weight = stored * `<layer>.scale_weight`
# (one value). `<layer>.scale_input` only serves ComfyUI's fp8 x fp8 matmuls: this code upcasts the
# weight instead, so it is not read. Unscaled fp8 files need nothing: their weights are fp8 tensors.
SCALED_FP8_MARKER = "scaled_fp8"


class WeightFile:
    """One part's weights: a .safetensors or .pth file, or a sharded *.index.json; tensors are read on demand.

    `shapes` comes from the safetensors headers alone, so checking a checkpoint reads no tensor data.
    It leaves out ComfyUI's scaled-fp8 extras; `scales` maps each scaled weight to its scale_weight key.
    """

    def __init__(self, path: str, part: str):
        self.path = path
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.where: dict[str, tuple[str, str]] = {}   # key -> (file, key as stored in the file)
        self.pth: dict[str, dict] = {}                 # .pth files, loaded once (memory-mapped if zip)
        index = self._read_index(path) if path.endswith(".index.json") else {}
        files = sorted({os.path.join(os.path.dirname(path), name) for name in index.values()}) or [path]
        stored_in = {}
        for file in files:
            shapes = self._read_shapes(file)
            stored_in[file] = set(shapes)
            for key, stored in _strip_prefix(list(shapes), part).items():
                if key in self.where:
                    raise CheckpointError(f"{key} is stored twice, in {self.where[key][0]} and {file}")
                self.shapes[key], self.where[key] = shapes[stored], (file, stored)
        self.scales: dict[str, str] = {}
        for key in [k for k in self.shapes if k == SCALED_FP8_MARKER or k.endswith((".scale_weight", ".scale_input"))]:
            shape = self.shapes.pop(key)
            if key.endswith(".scale_weight"):
                weight = key.removesuffix(".scale_weight") + ".weight"
                # One scale for the tensor, or one per output row (as FP8Linear keeps them).
                if weight not in self.shapes or math.prod(shape) not in (1, self.shapes[weight][0]):
                    raise CheckpointError(f"{path}: {key} {list(shape)} is not the scale of a weight in the "
                                          "file (expected one value, or one per output row); the file is corrupt")
                self.scales[weight] = key
        folder = os.path.dirname(path)
        if stale := [key for key, name in index.items() if key not in stored_in[os.path.join(folder, name)]]:
            raise CheckpointError(f"{path} lists {len(stale)} keys its shards do not hold ({listing(stale)}): "
                                  "a stale index or a corrupt shard; re-download")

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path} has no weight_map: not a sharded-checkpoint index")
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(os.path.dirname(path), name)):
                raise CheckpointError(f"shard {name} listed in {path} is missing: re-download it")
        return weight_map

    def _read_shapes(self, file: str) -> dict[str, tuple[int, ...]]:
        if not file.endswith((".safetensors", ".pth", ".pt")):
            raise CheckpointError(f"{file}: unknown weight file type (expected .safetensors or .pth)")
        try:
            if file.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:
                    return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            # .pth files are pickles: weights_only refuses anything but tensors and plain containers.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise CheckpointError(f"{file} is truncated or corrupt ({type(error).__name__}: {error}); "
                                  "re-download or re-save it") from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file} does not hold a plain state dict (name -> tensor)")
        self.pth[file] = state
        return {key: tuple(value.shape) for key, value in state.items()}

    def read(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for each key, one file at a time."""
        for file in sorted({self.where[key][0] for key in keys}):
            group = [key for key in keys if self.where[key][0] == file]
            if file in self.pth:
                yield from ((key, self.pth[file][self.where[key][1]]) for key in group)
                continue
            with safe_open(file, framework="pt") as f:   # its header was checked when the file was opened
                for key in group:   # one tensor at a time, so the caller's cast frees each source copy
                    try:
                        tensor = f.get_tensor(self.where[key][1])
                    except (SafetensorError, RuntimeError, OSError) as error:
                        raise CheckpointError(f"{file} is truncated or corrupt ({error}); re-download it") from error
                    yield key, tensor


# ---- precision policy: which tensor load_wan stores in which dtype ----
# dtype= sets the DiT and the umT5 (run in bf16 by the original), vae_dtype= the VAE (fp32 unless asked).
# Some DiT modules stay fp32 whatever dtype= says, as in the original Wan code (which runs them in
# fp32 under autocast) and diffusers' WanTransformer3DModel._keep_in_fp32_modules: the time embedding
# and projection, the modulation tables, the head and the norms. They hold about 1% of the weights,
# but every block reads them: bf16's 8-bit mantissa would shift every shift/scale/gate vector.
# Each is the start of a dotted component of our key names: blocks.3.modulation, blocks.3.self_attn.norm_q.weight.
DIT_FP32_MODULES = ("time_embedding", "time_projection", "modulation", "head", "norm")


def storage_dtype(part: str, key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which tensor `key` (our name) of `part` is stored when the part is loaded in `dtype`."""
    if part == "dit" and any(name.startswith(DIT_FP32_MODULES) for name in key.split(".")):
        return torch.float32
    return dtype


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in DTYPES.values():
        raise ValueError(f"{what}={dtype} is not one of {list(DTYPES.values())} (fp16 checkpoint files "
                         "load in either: they are cast on load)")


# ---- load_wan ----
def wan_model_id(cfg: WanConfig) -> str:
    """The preset name when the model equals one, else wan-custom-<hash of the model configs>."""
    for name, preset in PRESETS.items():
        if (preset.dit, preset.vae, preset.t5) == (cfg.dit, cfg.vae, cfg.t5):
            return name
    blob = json.dumps([dataclasses.asdict(c) for c in (cfg.dit, cfg.vae, cfg.t5)], sort_keys=True)
    return "wan-custom-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass
class WanModels:
    """What load_wan returns (parts not asked for are None) and save_diffusers writes."""
    cfg: WanConfig
    model_id: str                     # LoRA files record it to refuse loading onto another model
    dit: WanDiT | None
    vae: WanVAE | None
    text_encoder: UMT5Encoder | None
    tokenizer: Tokenizer | None


def _build_on_meta(part: str, cfg: WanConfig) -> nn.Module:
    with torch.device("meta"):   # shapes only: no memory, no init time, even for umT5-XXL
        if part == "dit":
            return WanDiT(cfg.dit)
        return WanVAE(cfg.vae) if part == "vae" else UMT5Encoder(cfg.t5)


def _summary(part: str, cfg: WanConfig) -> str:
    if part == "dit":
        return f"dim {cfg.dit.dim}, {cfg.dit.num_layers} blocks"
    if part == "vae":
        return f"base_dim {cfg.vae.base_dim}, z_dim {cfg.vae.z_dim}, dim_mult {cfg.vae.dim_mult}"
    return f"d_model {cfg.t5.dim}, {cfg.t5.num_layers} layers, vocab {cfg.t5.vocab_size}"


def _likely_fix(part: str, cfg: WanConfig, shapes: dict, missing: list, unexpected: list, wrong: list) -> str:
    sizes = {1536: "the 1.3B model (dim 1536)", 5120: "the 14B model (dim 5120)"}
    dim = shapes.get("patch_embedding.weight", (cfg.dit.dim,))[0]
    if part == "dit" and dim != cfg.dit.dim:
        return (f"the checkpoint is {sizes.get(dim, f'a dim-{dim} model')} but the config is "
                f"{sizes.get(cfg.dit.dim, f'a dim-{cfg.dit.dim} model')}: pass the matching --model folder or preset")
    if wrong:
        return "checkpoint and config describe different model sizes: use the config that came with the checkpoint"
    if unexpected and not missing:
        return "the file holds extra layers (Wan I2V, Wan2.2, an added module?); this loader reads Wan2.1 T2V"
    if missing and not unexpected:
        return "the file is incomplete (an interrupted download or save?): re-download it"
    return f"this is not a Wan2.1 T2V {PART_NAMES[part]} file; check which file went to which dit=/vae=/text_encoder="


@dataclass
class _Plan:
    """One part, checked and ready to load: its module on meta, its file, and our key -> file key(s)."""
    part: str
    module: nn.Module
    weights: WeightFile
    sources: dict[str, list[str]]


def _plan(part: str, weights: WeightFile, cfg: WanConfig) -> _Plan:
    """Match the file's keys and shapes to the module's, raising one CheckpointError that lists every problem."""
    module = _build_on_meta(part, cfg)
    key_map = part_keys(part, cfg)
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    mapped = {}
    for key in weights.shapes:
        try:
            mapped[key] = key_map.to_ours(key)
        except KeyError:
            mapped[key] = None
    # A file uses either our (original) names or the reference's: take whichever explains more keys.
    use_reference = sum(v in expected for v in mapped.values()) > sum(k in expected for k in weights.shapes)
    sources, unexpected, wrong = {}, [], []
    for key, shape in weights.shapes.items():
        ours = mapped[key] if use_reference else key
        if ours not in expected:
            unexpected.append(key)
        elif shape != expected[ours]:
            wrong.append(f"{key} {list(shape)} (model: {list(expected[ours])})")
            sources.setdefault(ours, [])
        else:
            sources.setdefault(ours, []).append(key)
    missing = [key_map.to_reference(k) if use_reference else k for k in expected if k not in sources]
    if missing or unexpected or wrong:
        name = PART_NAMES[part]
        lines = [f"{name} checkpoint {weights.path} does not fit the {name} config ({_summary(part, cfg)}):"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("tensors with the wrong shape", wrong)):
            if items:
                lines.append(f"  {len(items)} {label}: {listing(items)}")
        lines.append("Likely fix: " + _likely_fix(part, cfg, weights.shapes, missing, unexpected, wrong))
        raise CheckpointError("\n".join(lines))
    return _Plan(part, module, weights, sources)


def _load(plan: _Plan, device: torch.device | str, dtype: torch.dtype, fp8: bool = False) -> nn.Module:
    """Read the checked tensors one by one (cast right away to the policy's dtype: peak memory ~ the
    result) and assign them. fp8: the DiT's block linears become FP8Linear, their weights fp8."""
    owner = {key: ours for ours, keys in plan.sources.items() for key in keys}
    weight_of = {scale_key: weight for weight, scale_key in plan.weights.scales.items()}
    scales = {weight_of[key]: scale for key, scale in plan.weights.read(list(weight_of))}   # tiny: read first
    if fp8:
        quantize_fp8(plan.module)   # still on meta: only the layer types and the state dict keys change
    fp8_weights = {f"{name}.weight" for name, m in plan.module.named_modules() if isinstance(m, FP8Linear)}
    state = {}
    for key, tensor in plan.weights.read(list(owner)):
        if owner[key] in fp8_weights:
            # An e4m3fn weight keeps its bits (and its file scale); others are quantized, on the device (fast).
            weight, scale = to_fp8(tensor.to(device), scales.get(key))
            state[owner[key]], state[owner[key].removesuffix("weight") + "scale"] = weight, scale
            continue
        if key in scales:   # a scaled-fp8 weight kept in the policy's dtype: stored * scale
            tensor = tensor.float() * scales[key].float().reshape(-1, *[1] * (tensor.dim() - 1))
        if tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=storage_dtype(plan.part, owner[key], dtype))
        else:
            tensor = tensor.to(device=device)
        if owner[key] in state:   # a tied twin (umT5 shared / encoder.embed_tokens): both must agree
            if not torch.equal(state[owner[key]], tensor):
                raise CheckpointError(f"{plan.weights.path}: {key} differs from its tied twin "
                                      f"{plan.sources[owner[key]][0]}; the file is corrupt")
            continue
        state[owner[key]] = tensor
    plan.module.load_state_dict(state, strict=True, assign=True)  # strict: lists any key still astray
    return plan.module.eval()


def _open_tokenizer(path: str | None, cfg: WanConfig) -> Tokenizer:
    if path is None or not os.path.exists(path):
        raise CheckpointError(f"load_wan: no tokenizer ({path} does not exist); pass tokenizer=<folder>")
    try:
        tokenizer = Tokenizer(path, cfg.t5.text_len)
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"tokenizer {path}: {error}") from error
    if tokenizer.vocab_size > cfg.t5.vocab_size:
        raise CheckpointError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the umT5 embedding has "
                              f"{cfg.t5.vocab_size} rows: tokenizer and text encoder do not belong together")
    return tokenizer


def load_part(part: str, path: str, cfg: WanConfig, device="cpu", dtype=torch.float32, fp8: bool = False) -> nn.Module:
    """One module ("dit", "vae" or "text": the umT5 alone) from a weight file or index, checked against cfg.

    fp8 (DiT only): keep the block linears in float8_e4m3fn (model/fp8.py), upcast to dtype per layer.
    """
    if part not in PART_NAMES:
        raise ValueError(f"load_part: unknown part {part!r}; choose from {list(PART_NAMES)}")
    if fp8 and part != "dit":
        raise ValueError(f"load_part: fp8 storage is for the DiT's block linears, not the {PART_NAMES[part]}")
    _check_dtype(dtype, "load_part: dtype")
    return _load(_plan(part, WeightFile(path, part), cfg), device, dtype, fp8)


def load_wan(model: str | None, parts=("dit", "vae", "text"), device="cpu", dtype=torch.float32,
             dit: str | None = None, vae: str | None = None, text_encoder: str | None = None,
             tokenizer: str | None = None, vae_dtype=torch.float32, fp8: bool = False) -> WanModels:
    """Load the requested parts ("dit", "vae", "text" = umT5 + tokenizer) of a Wan2.1 T2V model.

    dtype: the DiT's and umT5's (fp32 or bf16; a few DiT modules stay fp32: DIT_FP32_MODULES);
    vae_dtype: the VAE's, fp32 by default as in the original.
    fp8: store the DiT's block linears in float8_e4m3fn, upcast to dtype per layer (model/fp8.py).

    model: a PRESETS name (then every part comes from a file below), a diffusers or original-layout
    folder (one named like a preset: write ./name), or None (the config of the dit= file's release;
    the 1.3B preset without one).
    dit / vae / text_encoder / tokenizer: files (a folder for the tokenizer) that replace that part.
    """
    if unknown := set(parts) - set(PART_NAMES):
        raise ValueError(f"load_wan: unknown parts {sorted(unknown)}; choose from {list(PART_NAMES)}")
    _check_dtype(dtype, "load_wan: dtype")
    _check_dtype(vae_dtype, "load_wan: vae_dtype")
    overrides = {"dit": dit, "vae": vae, "text": text_encoder, "tokenizer": tokenizer}
    flags = {"dit": "dit", "vae": "vae", "text": "text_encoder", "tokenizer": "tokenizer"}
    paths = {}
    if model in PRESETS:
        cfg = PRESETS[model]
    elif model is not None and os.path.isdir(model):
        cfg, paths = read_folder(model)
    elif model is not None:
        if os.path.isfile(model):
            raise CheckpointError(f"load_wan: {model} is a file; pass a checkpoint folder as model and single "
                                  "files as dit= / vae= / text_encoder=")
        raise FileNotFoundError(f"load_wan: {model!r} is neither an existing folder nor a preset "
                                f"({', '.join(PRESETS)})")
    for part, path in overrides.items():
        if path is not None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"load_wan: {flags[part]}={path} does not exist")
            paths[part] = path

    # Open every requested file (headers only) and check it fully before reading any tensor.
    files = {}
    for part in [p for p in PART_NAMES if p in parts]:
        if part not in paths or not os.path.exists(paths[part]):
            where = f"{paths[part]} does not exist" if part in paths else f"{model!r} provides none"
            raise CheckpointError(f"load_wan: no {PART_NAMES[part]} weights: {where}; pass {flags[part]}=<file>")
        files[part] = WeightFile(paths[part], part)
    if model is None:   # a lone DiT file says which release it is; the VAE and umT5 are the same in both
        # (its header only, also when the DiT itself is not asked for: parts=() reads just the config)
        dit_file = files.get("dit") or (WeightFile(paths["dit"], "dit") if "dit" in paths else None)
        cfg = config_from_dit_shapes(dit_file.shapes, paths["dit"]) if dit_file else PRESETS["wan2.1-t2v-1.3b"]
    plans = [_plan(part, weights, cfg) for part, weights in files.items()]
    text_tokenizer = _open_tokenizer(paths.get("tokenizer"), cfg) if "text" in parts else None

    # Everything checked: now read the tensors.
    loaded = {plan.part: _load(plan, device, vae_dtype if plan.part == "vae" else dtype, fp8 and plan.part == "dit")
              for plan in plans}
    return WanModels(cfg, wan_model_id(cfg), loaded.get("dit"), loaded.get("vae"), loaded.get("text"),
                     text_tokenizer)


# ---- the scripts' model flags: one folder, and/or single part files (ComfyUI) that replace its parts ----
def add_model_arguments(parser) -> None:
    """--model, --dit, --vae, --text-encoder, --tokenizer, as train.py and sample.py take them."""
    parser.add_argument("--model", help="Wan checkpoint folder (diffusers or original layout) or preset name "
                        "(default: the project's toy model)")
    parser.add_argument("--dit", help="DiT weights file (e.g. a ComfyUI single file), instead of or over --model's")
    parser.add_argument("--vae", help="VAE weights file (e.g. ComfyUI's wan_2.1_vae.safetensors)")
    parser.add_argument("--text-encoder", help="umT5 weights file (e.g. ComfyUI's umt5_xxl_*.safetensors)")
    parser.add_argument("--tokenizer", help="umT5 tokenizer folder (with spiece.model), when --model has none")


def add_runtime_arguments(parser) -> None:
    """--device, --dtype, --fp8, --offload-blocks, --threads: where and how the base model runs, as
    train.py and sample.py take them (docs/performance.md#memory)."""
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="base weight dtype, and train.py's autocast dtype (bf16 on GPUs)")
    parser.add_argument("--fp8", action="store_true", help="store the DiT block linears in fp8 (e4m3) with a "
                        "scale, upcast per layer: half of bf16's weight memory")
    parser.add_argument("--offload-blocks", type=int, default=0, help="keep the weights of the first N DiT blocks "
                        "in CPU memory and copy each in just before it runs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s: it stays fast "
                        "when other jobs share the cores, where 2 threads on a 2-core machine ran 15-150x slower)")


def single_files(args) -> dict[str, str | None]:
    """The part files given one by one on the command line, as load_wan's overrides."""
    return {"dit": args.dit, "vae": args.vae, "text_encoder": args.text_encoder, "tokenizer": args.tokenizer}
