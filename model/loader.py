"""Checkpoint loading and saving for Wan2.1 T2V: diffusers folders, the original release and ComfyUI
single files in; diffusers folders out.

Our module names are the ORIGINAL Wan names (blocks.N.self_attn.q, norm3, ffn.0, ...), because the
original and ComfyUI checkpoints and most LoRAs use them. diffusers / transformers names are mapped
here, in one place: three tables of (ours, reference) key templates read in both directions
(shared/reference/wan.md section 2).

Loading (STYLE.md principle 10): build each module on the meta device, read only the checkpoint's key
names and shapes, check the full key set and every shape, and only then read the tensors and
load_state_dict(strict=True, assign=True). A bad checkpoint raises CheckpointError naming the file,
the offending keys and the likely fix before any tensor is read: no half-loaded model is returned.

Layouts read by load_wan (wan.md section 8):
  diffusers     model_index.json; transformer/ vae/ text_encoder/ tokenizer/ (weights single or sharded)
  original      config.json ("_class_name": "WanModel"), diffusion_pytorch_model*.safetensors,
                Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (the tokenizer)
  single files  the dit= / vae= / text_encoder= overrides (ComfyUI: original DiT and VAE names,
                transformers umT5 names), keys optionally under one of SINGLE_FILE_PREFIXES
A file may use our names or the reference's: each is read in whichever explains more of its keys.

Configs come from the checkpoint where it has one (diffusers */config.json, the original config.json);
a diffusers text_len from tokenizer_config.json's model_max_length when it is 1..512 (else 512); the
original VAE / umT5 and lone files use the release configs (a lone DiT: 1.3B or 14B by its width).
Sampling defaults come from the preset the model equals, else from WanConfig. Our extension:
`wan_config.json` at a folder's root holds a whole WanConfig (dataclasses.asdict); it supplies what the
checkpoint lacks (sampling defaults, the original layout's VAE / umT5 configs) and must agree with the
rest. diffusers ignores it.
"""
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import PRESETS, WAN_LATENT_MEAN, WAN_LATENT_STD, DiTConfig, T5Config, VAEConfig, WanConfig
from model.dit import WanDiT
from model.text_encoder import Tokenizer, UMT5Encoder
from model.vae import WanVAE


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file, the keys and the fix."""


def _listing(items, limit: int = 8) -> str:
    """'a, b, c ... and 12 more': error messages stay readable for a 14B model's key list."""
    items = [str(item) for item in items]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ---- key maps: ours (= original Wan) <-> diffusers / transformers ----
# A rule pairs one of our key templates with the reference's. "#" stands for a layer number and "*"
# for "weight" or "bias"; both sides have the same placeholders in the same order.

class KeyMap:
    """A table of (ours, reference) key templates, read in either direction."""

    def __init__(self, reference: str, rules: list[tuple[str, str]]):
        self.reference = reference       # whose names the right-hand side is, for error messages
        self.rules = [(ours, ref, self._regex(ours), self._regex(ref)) for ours, ref in rules]

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\#", r"(\d+)").replace(r"\*", "(weight|bias)"))

    @staticmethod
    def _fill(template: str, values: tuple[str, ...]) -> str:
        values = iter(values)
        return re.sub(r"[#*]", lambda _: next(values), template)

    def to_ours(self, key: str) -> str:
        for ours, _, _, ref_regex in self.rules:
            if match := ref_regex.fullmatch(key):
                return self._fill(ours, match.groups())
        raise KeyError(f"no rule maps the {self.reference} key {key!r} to ours")

    def to_reference(self, key: str) -> str:
        # The first matching rule wins, so a tied pair maps back to the canonical name (umT5 `shared`).
        for _, ref, ours_regex, _ in self.rules:
            if match := ours_regex.fullmatch(key):
                return self._fill(ref, match.groups())
        raise KeyError(f"no rule maps our key {key!r} to a {self.reference} key")


# DiT (wan.md 2.1). The original's parameter-free norm1/norm2/head.norm have no keys.
DIT_KEYS = KeyMap("diffusers WanTransformer3DModel", [
    ("patch_embedding.*", "patch_embedding.*"),
    ("text_embedding.0.*", "condition_embedder.text_embedder.linear_1.*"),
    ("text_embedding.2.*", "condition_embedder.text_embedder.linear_2.*"),
    ("time_embedding.0.*", "condition_embedder.time_embedder.linear_1.*"),
    ("time_embedding.2.*", "condition_embedder.time_embedder.linear_2.*"),
    ("time_projection.1.*", "condition_embedder.time_proj.*"),
    ("blocks.#.modulation", "blocks.#.scale_shift_table"),
    # self_attn = attn1, cross_attn = attn2, each with q, k, v, o and the RMSNorms on q and k
    *[(f"blocks.#.{ours}.{a}", f"blocks.#.{ref}.{b}")
      for ours, ref in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q.*", "to_q.*"), ("k.*", "to_k.*"), ("v.*", "to_v.*"), ("o.*", "to_out.0.*"),
                   ("norm_q.weight", "norm_q.weight"), ("norm_k.weight", "norm_k.weight"))],
    ("blocks.#.norm3.*", "blocks.#.norm2.*"),  # the affine cross-attention LayerNorm: names swapped
    ("blocks.#.ffn.0.*", "blocks.#.ffn.net.0.proj.*"),
    ("blocks.#.ffn.2.*", "blocks.#.ffn.net.2.*"),
    ("head.modulation", "scale_shift_table"),
    ("head.head.*", "proj_out.*"),
])

# Wan-VAE (wan.md 2.2). A residual block is one Sequential [norm, SiLU, conv, norm, SiLU, Dropout, conv].
_VAE_RESIDUAL = [("residual.0.gamma", "norm1.gamma"), ("residual.2.*", "conv1.*"),
                 ("residual.3.gamma", "norm2.gamma"), ("residual.6.*", "conv2.*"), ("shortcut.*", "conv_shortcut.*")]
_VAE_RESAMPLE = [("resample.1.*", "resample.1.*"), ("time_conv.*", "time_conv.*")]
_VAE_ATTENTION = [("norm.gamma", "norm.gamma"), ("to_qkv.*", "to_qkv.*"), ("proj.*", "proj.*")]


@lru_cache
def vae_keys(num_res_blocks: int = 2, num_stages: int = 4) -> KeyMap:
    """The VAE table of a config (VAEConfig.num_res_blocks, len(dim_mult)): the decoder indices depend on it."""
    rules = [("conv1.*", "quant_conv.*"), ("conv2.*", "post_quant_conv.*")]
    for coder in ("encoder", "decoder"):
        rules += [(f"{coder}.conv1.*", f"{coder}.conv_in.*"), (f"{coder}.head.0.gamma", f"{coder}.norm_out.gamma"),
                  (f"{coder}.head.2.*", f"{coder}.conv_out.*")]
        # middle = [residual, attention, residual]
        rules += [(f"{coder}.middle.0.{a}", f"{coder}.mid_block.resnets.0.{b}") for a, b in _VAE_RESIDUAL]
        rules += [(f"{coder}.middle.1.{a}", f"{coder}.mid_block.attentions.0.{b}") for a, b in _VAE_ATTENTION]
        rules += [(f"{coder}.middle.2.{a}", f"{coder}.mid_block.resnets.1.{b}") for a, b in _VAE_RESIDUAL]
    # The encoder: diffusers keeps the original flat list, only renamed.
    rules += [(f"encoder.downsamples.#.{a}", f"encoder.down_blocks.#.{b}") for a, b in _VAE_RESIDUAL + _VAE_RESAMPLE]
    # The decoder: diffusers nests stage s as up_blocks.s.resnets.r (num_res_blocks + 1 of them) plus
    # up_blocks.s.upsamplers.0; the original flattens them to upsamples[s * (num_res_blocks + 2) + r].
    per_stage = num_res_blocks + 2
    for s in range(num_stages):
        for r in range(num_res_blocks + 1):
            rules += [(f"decoder.upsamples.{s * per_stage + r}.{a}", f"decoder.up_blocks.{s}.resnets.{r}.{b}")
                      for a, b in _VAE_RESIDUAL]
        rules += [(f"decoder.upsamples.{s * per_stage + num_res_blocks + 1}.{a}",
                   f"decoder.up_blocks.{s}.upsamplers.0.{b}") for a, b in _VAE_RESAMPLE]
    return KeyMap("diffusers AutoencoderKLWan", rules)


# umT5 encoder (wan.md 2.3): layer.0 is the self-attention sublayer, with its own relative-bias table
# in umT5; layer.1 is the gated FFN. ComfyUI's umT5 files use these transformers names too.
T5_KEYS = KeyMap("transformers UMT5EncoderModel", [
    ("token_embedding.weight", "shared.weight"),
    ("token_embedding.weight", "encoder.embed_tokens.weight"),  # tied to `shared`; a file may hold both
    ("norm.weight", "encoder.final_layer_norm.weight"),
    ("blocks.#.norm1.weight", "encoder.block.#.layer.0.layer_norm.weight"),
    ("blocks.#.attn.q.weight", "encoder.block.#.layer.0.SelfAttention.q.weight"),
    ("blocks.#.attn.k.weight", "encoder.block.#.layer.0.SelfAttention.k.weight"),
    ("blocks.#.attn.v.weight", "encoder.block.#.layer.0.SelfAttention.v.weight"),
    ("blocks.#.attn.o.weight", "encoder.block.#.layer.0.SelfAttention.o.weight"),
    ("blocks.#.pos_embedding.embedding.weight", "encoder.block.#.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("blocks.#.norm2.weight", "encoder.block.#.layer.1.layer_norm.weight"),
    ("blocks.#.ffn.gate.0.weight", "encoder.block.#.layer.1.DenseReluDense.wi_0.weight"),  # the GELU branch
    ("blocks.#.ffn.fc1.weight", "encoder.block.#.layer.1.DenseReluDense.wi_1.weight"),     # the linear branch
    ("blocks.#.ffn.fc2.weight", "encoder.block.#.layer.1.DenseReluDense.wo.weight"),
])


def dit_key_from_diffusers(key: str) -> str:
    """`blocks.3.attn2.to_out.0.weight` -> `blocks.3.cross_attn.o.weight`; KeyError naming unknown keys."""
    return DIT_KEYS.to_ours(key)


def vae_key_from_diffusers(key: str, num_res_blocks: int = 2, num_stages: int = 4) -> str:
    """`decoder.up_blocks.1.resnets.0.conv1.weight` -> `decoder.upsamples.4.residual.2.weight` (released VAE)."""
    return vae_keys(num_res_blocks, num_stages).to_ours(key)


def t5_key_from_transformers(key: str) -> str:
    """`encoder.block.0.layer.1.DenseReluDense.wo.weight` -> `blocks.0.ffn.fc2.weight`.

    ComfyUI's scaled-fp8 extras (`scaled_fp8`, `*.scale_weight`) are not handled and raise KeyError here.
    """
    return T5_KEYS.to_ours(key)


# ---- reading weight files ----
# Prefixes that whole-model files put before a part's keys (ComfyUI's checkpoint layout). Keys under the
# part's prefix are taken with it stripped; keys under another part's prefix are left to that part. A
# file without any of them is read as is. Nothing else is ever stripped.
SINGLE_FILE_PREFIXES = {
    "dit": ("model.diffusion_model.", "diffusion_model."),
    "vae": ("vae.", "first_stage_model."),
    "text": ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer."),
}
PART_NAMES = {"dit": "DiT", "vae": "VAE", "text": "umT5 text encoder"}


def _strip_prefix(keys: list[str], part: str) -> dict[str, str]:
    """{key as our loader sees it: key stored in the file}."""
    for prefix in SINGLE_FILE_PREFIXES[part]:
        if any(key.startswith(prefix) for key in keys):
            other_parts = tuple(p for prefixes in SINGLE_FILE_PREFIXES.values() for p in prefixes)
            stray = {key: key for key in keys if not key.startswith(other_parts)}  # reported as unexpected
            return stray | {key[len(prefix):]: key for key in keys if key.startswith(prefix)}
    return {key: key for key in keys}


class WeightFile:
    """One part's weights: a .safetensors or .pth file, or a sharded *.index.json; tensors are read on demand.

    `shapes` comes from the safetensors headers alone, so checking a checkpoint reads no tensor data.
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
        folder = os.path.dirname(path)
        if stale := [key for key, name in index.items() if key not in stored_in[os.path.join(folder, name)]]:
            raise CheckpointError(f"{path} lists {len(stale)} keys its shards do not hold ({_listing(stale)}): "
                                  "a stale index or a corrupt shard; re-download")

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        weight_map = _read_json(path).get("weight_map")
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


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}): re-download it") from error


# ---- configs ----
# WanModel.__init__ defaults (orig wan/modules/model.py): what a key missing from the original config.json means.
WANMODEL_DEFAULTS = {"model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512, "in_dim": 16, "dim": 2048,
                     "ffn_dim": 8192, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 16,
                     "num_layers": 32, "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
WAN_CONFIG_FILE = "wan_config.json"     # our extension, see the module docstring


def _require(config: dict, path: str, **fixed) -> None:
    """Refuse configs of Wan variants our modules do not implement (I2V, Wan2.2, ...)."""
    for key, value in fixed.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{path}: {key}={config[key]!r} is not supported (Wan2.1 T2V has {value!r})")


def _dit_from_diffusers(c: dict, path: str, text_len: int) -> DiTConfig:
    _require(c, path, _class_name="WanTransformer3DModel", qk_norm="rms_norm_across_heads", cross_attn_norm=True,
             image_dim=None, added_kv_proj_dim=None, pos_embed_seq_len=None)
    # diffusers has no text_len: the pipeline pads prompts; ours comes from the tokenizer folder.
    return DiTConfig(dim=c["num_attention_heads"] * c["attention_head_dim"], ffn_dim=c["ffn_dim"],
                     num_heads=c["num_attention_heads"], num_layers=c["num_layers"], in_dim=c["in_channels"],
                     out_dim=c["out_channels"], text_dim=c["text_dim"], text_len=text_len, freq_dim=c["freq_dim"],
                     patch_size=tuple(c["patch_size"]), rope_max_len=c.get("rope_max_seq_len", 1024), eps=c["eps"])


def _dit_from_original(c: dict, path: str) -> DiTConfig:
    c = {**WANMODEL_DEFAULTS, **c}
    _require(c, path, model_type="t2v", qk_norm=True, cross_attn_norm=True, window_size=[-1, -1])
    return DiTConfig(dim=c["dim"], ffn_dim=c["ffn_dim"], num_heads=c["num_heads"], num_layers=c["num_layers"],
                     in_dim=c["in_dim"], out_dim=c["out_dim"], text_dim=c["text_dim"], text_len=c["text_len"],
                     freq_dim=c["freq_dim"], patch_size=tuple(c["patch_size"]), eps=c["eps"])


def _vae_from_diffusers(c: dict, path: str) -> VAEConfig:
    _require(c, path, _class_name="AutoencoderKLWan", attn_scales=[], is_residual=False, patch_size=None,
             decoder_base_dim=None, in_channels=3, out_channels=3)
    return VAEConfig(base_dim=c["base_dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                     num_res_blocks=c["num_res_blocks"], temporal_downsample=tuple(c["temperal_downsample"]),
                     latents_mean=tuple(c.get("latents_mean", WAN_LATENT_MEAN)),
                     latents_std=tuple(c.get("latents_std", WAN_LATENT_STD)))


def _t5_from_transformers(c: dict, path: str, text_len: int) -> T5Config:
    _require(c, path, model_type="umt5", feed_forward_proj="gated-gelu")  # classic T5 shares one bias table
    return T5Config(vocab_size=c["vocab_size"], dim=c["d_model"], num_heads=c["num_heads"], head_dim=c["d_kv"],
                    ffn_dim=c["d_ff"], num_layers=c["num_layers"], num_buckets=c["relative_attention_num_buckets"],
                    max_distance=c["relative_attention_max_distance"], text_len=text_len,
                    eps=c["layer_norm_epsilon"])


def _read_config(path: str, reader, *args):
    """reader(config dict, path, *args), with a missing or malformed field reported against the file."""
    try:
        return reader(_read_json(path), path, *args)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read the config ({type(error).__name__}: {error})") from error


def _read_wan_config(folder: str) -> dict:
    """The fields of wan_config.json (sub-configs as dataclasses), or {} without one."""
    path = os.path.join(folder, WAN_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    fields = _read_json(path)
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(WanConfig)}):
        raise CheckpointError(f"{path}: unknown WanConfig fields {_listing(unknown)}")
    try:
        for name, cls in (("dit", DiTConfig), ("vae", VAEConfig), ("t5", T5Config)):
            if name in fields:   # JSON has lists where the dataclasses hold tuples
                fields[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields[name].items()})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid {name} config ({error})") from error
    return fields


def _tokenizer_text_len(tokenizer_dir: str) -> int | None:
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    length = _read_json(path).get("model_max_length") if os.path.isfile(path) else None
    # HF writes a huge placeholder when unset, and Wan pads to 512: only 1..512 is a real text length.
    return length if isinstance(length, int) and 0 < length <= 512 else None


def _assemble(dit: DiTConfig, vae: VAEConfig, t5: T5Config, extra: dict, source: str) -> WanConfig:
    """The WanConfig of a checkpoint: its model configs, and the sampling fields of the matching preset
    (WanConfig defaults for other models) unless wan_config.json gives them."""
    for name, read in (("dit", dit), ("vae", vae), ("t5", t5)):
        if name in extra and extra[name] != read:
            diff = [f"{f.name} {getattr(extra[name], f.name)} vs {getattr(read, f.name)}"
                    for f in dataclasses.fields(read) if getattr(extra[name], f.name) != getattr(read, f.name)]
            raise CheckpointError(f"{source}/{WAN_CONFIG_FILE} disagrees with the checkpoint's {name} config "
                                  f"({_listing(diff)}): fix or delete {WAN_CONFIG_FILE}")
    base = next((p for p in PRESETS.values() if (p.dit, p.vae, p.t5) == (dit, vae, t5)), WanConfig())
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(WanConfig)} | extra
    try:
        return WanConfig(**(fields | {"dit": dit, "vae": vae, "t5": t5}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: inconsistent model configs: {error}") from error


def _find_weights(folder: str, stem: str) -> str:
    """stem.safetensors.index.json when sharded, else stem.safetensors (which may not exist)."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    return index if os.path.isfile(index) else os.path.join(folder, f"{stem}.safetensors")


def _read_folder(folder: str) -> tuple[WanConfig, dict[str, str]]:
    """The config and the per-part weight paths of a diffusers or original-layout folder."""
    extra = _read_wan_config(folder)
    join = lambda *names: os.path.join(folder, *names)  # noqa: E731
    original = os.path.isfile(join("config.json")) and _read_json(join("config.json")).get("_class_name") == "WanModel"
    if os.path.isfile(join("model_index.json")):
        index = _read_json(join("model_index.json"))
        if index.get("_class_name") != "WanPipeline" or (index.get("transformer_2") or [None])[0]:
            raise CheckpointError(f"{folder} holds a {index.get('_class_name')} (second transformer: "
                                  f"{index.get('transformer_2')}); this loader reads Wan2.1 T2V (WanPipeline)")
        text_len = (extra["t5"].text_len if "t5" in extra else None) or _tokenizer_text_len(join("tokenizer")) or 512
        dit = _read_config(join("transformer", "config.json"), _dit_from_diffusers, text_len)
        vae = _read_config(join("vae", "config.json"), _vae_from_diffusers)
        t5 = _read_config(join("text_encoder", "config.json"), _t5_from_transformers, text_len)
        paths = {"dit": _find_weights(join("transformer"), "diffusion_pytorch_model"),
                 "vae": _find_weights(join("vae"), "diffusion_pytorch_model"),
                 "text": _find_weights(join("text_encoder"), "model"), "tokenizer": join("tokenizer")}
    elif original:
        dit = _read_config(join("config.json"), _dit_from_original)
        # The release ships no VAE / umT5 config: the real ones, unless wan_config.json says otherwise.
        vae = extra.get("vae", VAEConfig())
        t5 = extra.get("t5", T5Config(text_len=dit.text_len))
        paths = {"dit": _find_weights(folder, "diffusion_pytorch_model"), "vae": join("Wan2.1_VAE.pth"),
                 "text": join("models_t5_umt5-xxl-enc-bf16.pth"), "tokenizer": join("google", "umt5-xxl")}
    else:
        raise CheckpointError(f"{folder} is neither a diffusers Wan folder (model_index.json) nor an original "
                              f"Wan2.1 release (config.json with \"_class_name\": \"WanModel\"); it holds "
                              f"{_listing(sorted(os.listdir(folder))) or 'nothing'}")
    return _assemble(dit, vae, t5, extra, folder), paths


def config_from_dit_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> WanConfig:
    """The release preset of a lone DiT file: its width picks 1.3B or 14B, its keys the number of blocks."""
    if "patch_embedding.weight" not in shapes:
        raise CheckpointError(f"{source} has no patch_embedding.weight: not a Wan DiT file")
    dim = shapes["patch_embedding.weight"][0]
    preset = next((PRESETS[n] for n in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b") if PRESETS[n].dit.dim == dim), None)
    if preset is None:
        raise CheckpointError(f"cannot tell the config of {source}: dim {dim} is neither Wan2.1 1.3B (1536) nor "
                              "14B (5120); pass model= its folder or a preset name")
    num_layers = len({match[1] for key in shapes if (match := re.match(r"blocks\.(\d+)\.", key))})
    return dataclasses.replace(preset, dit=dataclasses.replace(preset.dit, num_layers=num_layers))


def wan_model_id(cfg: WanConfig) -> str:
    """The preset name when the model equals one, else wan-custom-<hash of the model configs>."""
    for name, preset in PRESETS.items():
        if (preset.dit, preset.vae, preset.t5) == (cfg.dit, cfg.vae, cfg.t5):
            return name
    blob = json.dumps([dataclasses.asdict(c) for c in (cfg.dit, cfg.vae, cfg.t5)], sort_keys=True)
    return "wan-custom-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


# ---- load_wan ----
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


def _key_map(part: str, cfg: WanConfig) -> KeyMap:
    if part == "dit":
        return DIT_KEYS
    return vae_keys(cfg.vae.num_res_blocks, len(cfg.vae.dim_mult)) if part == "vae" else T5_KEYS


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
    key_map = _key_map(part, cfg)
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
                lines.append(f"  {len(items)} {label}: {_listing(items)}")
        lines.append("Likely fix: " + _likely_fix(part, cfg, weights.shapes, missing, unexpected, wrong))
        raise CheckpointError("\n".join(lines))
    return _Plan(part, module, weights, sources)


def _load(plan: _Plan, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Read the checked tensors one by one (cast right away: peak memory ~ the result) and assign them."""
    owner = {key: ours for ours, keys in plan.sources.items() for key in keys}
    state = {}
    for key, tensor in plan.weights.read(list(owner)):
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
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


def load_part(part: str, path: str, cfg: WanConfig, device="cpu", dtype=torch.float32) -> nn.Module:
    """One module ("dit", "vae" or "text": the umT5 alone) from a weight file or index, checked against cfg."""
    if part not in PART_NAMES:
        raise ValueError(f"load_part: unknown part {part!r}; choose from {list(PART_NAMES)}")
    return _load(_plan(part, WeightFile(path, part), cfg), device, dtype)


def load_wan(model: str | None, parts=("dit", "vae", "text"), device="cpu", dtype=torch.float32,
             dit: str | None = None, vae: str | None = None, text_encoder: str | None = None,
             tokenizer: str | None = None) -> WanModels:
    """Load the requested parts ("dit", "vae", "text" = umT5 + tokenizer) of a Wan2.1 T2V model.

    model: a PRESETS name (then every part comes from a file below), a diffusers or original-layout
    folder (one named like a preset: write ./name), or None (the config of the dit= file's release;
    the 1.3B preset without one).
    dit / vae / text_encoder / tokenizer: files (a folder for the tokenizer) that replace that part.
    """
    if unknown := set(parts) - set(PART_NAMES):
        raise ValueError(f"load_wan: unknown parts {sorted(unknown)}; choose from {list(PART_NAMES)}")
    overrides = {"dit": dit, "vae": vae, "text": text_encoder, "tokenizer": tokenizer}
    flags = {"dit": "dit", "vae": "vae", "text": "text_encoder", "tokenizer": "tokenizer"}
    paths = {}
    if model in PRESETS:
        cfg = PRESETS[model]
    elif model is not None and os.path.isdir(model):
        cfg, paths = _read_folder(model)
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
        cfg = (config_from_dit_shapes(files["dit"].shapes, paths["dit"]) if "dit" in files
               else PRESETS["wan2.1-t2v-1.3b"])
    plans = [_plan(part, weights, cfg) for part, weights in files.items()]
    text_tokenizer = _open_tokenizer(paths.get("tokenizer"), cfg) if "text" in parts else None

    # Everything checked: now read the tensors.
    loaded = {plan.part: _load(plan, device, dtype) for plan in plans}
    return WanModels(cfg, wan_model_id(cfg), loaded.get("dit"), loaded.get("vae"), loaded.get("text"),
                     text_tokenizer)


# ---- save_diffusers ----
DIFFUSERS_VERSION = "0.42.1"   # the diffusers release this folder layout was checked against


def _diffusers_configs(cfg: WanConfig, tokenizer: Tokenizer, dtype: str) -> dict[str, dict]:
    """Every JSON file of a diffusers WanPipeline folder, by relative path."""
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    dit, vae, t5 = cfg.dit, cfg.vae, cfg.t5
    return {
        "model_index.json": {"_class_name": "WanPipeline", **version,
                             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                             "text_encoder": ["transformers", "UMT5EncoderModel"],
                             "tokenizer": ["transformers", "T5TokenizerFast"],
                             "transformer": ["diffusers", "WanTransformer3DModel"],
                             "vae": ["diffusers", "AutoencoderKLWan"]},
        "transformer/config.json": {
            "_class_name": "WanTransformer3DModel", **version, "patch_size": list(dit.patch_size),
            "num_attention_heads": dit.num_heads, "attention_head_dim": dit.head_dim, "in_channels": dit.in_dim,
            "out_channels": dit.out_dim, "text_dim": dit.text_dim, "freq_dim": dit.freq_dim, "ffn_dim": dit.ffn_dim,
            "num_layers": dit.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
            "eps": dit.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": dit.rope_max_len},
        "vae/config.json": {
            "_class_name": "AutoencoderKLWan", **version, "base_dim": vae.base_dim, "z_dim": vae.z_dim,
            "dim_mult": list(vae.dim_mult), "num_res_blocks": vae.num_res_blocks, "attn_scales": [],
            "temperal_downsample": list(vae.temporal_downsample), "dropout": 0.0,
            "latents_mean": list(vae.latents_mean), "latents_std": list(vae.latents_std)},
        "text_encoder/config.json": {
            "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": t5.vocab_size,
            "d_model": t5.dim, "d_kv": t5.head_dim, "d_ff": t5.ffn_dim, "num_layers": t5.num_layers,
            "num_decoder_layers": t5.num_layers, "num_heads": t5.num_heads,
            "relative_attention_num_buckets": t5.num_buckets, "relative_attention_max_distance": t5.max_distance,
            "layer_norm_epsilon": t5.eps, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "is_encoder_decoder": True, "tie_word_embeddings": False, "dropout_rate": 0.1,
            "pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id, "decoder_start_token_id": 0,
            "tokenizer_class": "T5Tokenizer", "dtype": dtype},
        # Wan's sampler (wan.md 5): UniPC on flow-matching sigmas, shifted by the model's sample_shift.
        "scheduler/scheduler_config.json": {
            "_class_name": "UniPCMultistepScheduler", **version, "num_train_timesteps": cfg.num_train_timesteps,
            "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": cfg.sample_shift,
            "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
            "final_sigmas_type": "zero"},
        **_tokenizer_configs(tokenizer),
        WAN_CONFIG_FILE: dataclasses.asdict(cfg),
    }


def _tokenizer_configs(tokenizer: Tokenizer) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json that transformers' T5Tokenizer and our Tokenizer
    read back to the same ids: every special token with its explicit id (transformers is not needed
    at runtime, so no tokenizer.json is written; it rebuilds one from spiece.model)."""
    sp, special = tokenizer.sp, tokenizer.special_ids
    sentinels = sorted((t for t in special if re.fullmatch(r"<extra_id_\d+>", t)), key=lambda t: int(t[10:-1]))
    tokens = {"eos_token": sp.id_to_piece(tokenizer.eos_id), "pad_token": sp.id_to_piece(tokenizer.pad_id),
              "unk_token": sp.id_to_piece(sp.unk_id()), "additional_special_tokens": sentinels}
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    added = {str(i): {"content": token, **flags} for token, i in sorted(special.items(), key=lambda item: item[1])}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": tokenizer.text_len, "extra_ids": len(sentinels),
              **tokens, "added_tokens_decoder": added}
    return {"tokenizer/tokenizer_config.json": config, "tokenizer/special_tokens_map.json": tokens}


def save_diffusers(folder: str, models: WanModels, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers WanPipeline folder (plus wan_config.json) that load_wan and diffusers both load.

    Atomic: everything goes to a hidden temp folder next to `folder`, renamed into place at the end.
    dtype (e.g. torch.bfloat16) casts the weights on the way out; None keeps the modules' dtypes.
    """
    absent = [name for name in ("dit", "vae", "text_encoder", "tokenizer") if getattr(models, name) is None]
    if absent:
        raise ValueError(f"save_diffusers: a diffusers folder needs every part; missing {absent}")
    cfg = models.cfg   # the config files are written from it, so the modules must be built from it
    if (models.dit.cfg, models.vae.cfg, models.text_encoder.cfg) != (cfg.dit, cfg.vae, cfg.t5) or \
            models.tokenizer.text_len != cfg.t5.text_len:
        raise ValueError("save_diffusers: the modules' or the tokenizer's configs differ from models.cfg")
    if os.path.exists(folder):
        raise FileExistsError(f"save_diffusers: {folder} exists; choose a new folder or delete it first")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.partial-", dir=parent)
    try:
        weights = {  # relative path -> (module, key map)
            "transformer/diffusion_pytorch_model.safetensors": (models.dit, DIT_KEYS),
            "vae/diffusion_pytorch_model.safetensors": (models.vae, _key_map("vae", cfg)),
            "text_encoder/model.safetensors": (models.text_encoder, T5_KEYS),
        }
        for name, (module, key_map) in weights.items():
            tensors = {key_map.to_reference(key): value.detach().to("cpu", dtype or value.dtype).contiguous()
                       for key, value in module.state_dict().items()}
            os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})  # transformers wants "format"
        text_dtype = str(dtype or models.text_encoder.norm.weight.dtype).removeprefix("torch.")
        for name, content in _diffusers_configs(cfg, models.tokenizer, text_dtype).items():
            os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "tokenizer", "spiece.model"), "wb") as f:
            f.write(models.tokenizer.sp.serialized_model_proto())   # the very sentencepiece model we loaded
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # never leave a half-written checkpoint behind
        raise
