"""Wan2.1 T2V checkpoint folders: which layout a folder has, where each part's weights are, and the
WanConfig it describes; plus CheckpointError, the one error a bad checkpoint raises. No tensor is read
here: model/loader.py checks and loads the weights.

Layouts (docs/wan.md#checkpoint-layouts):
  diffusers     model_index.json; transformer/ vae/ text_encoder/ tokenizer/ (weights single or sharded)
  original      config.json ("_class_name": "WanModel"), diffusion_pytorch_model*.safetensors,
                Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (the tokenizer)
  single files  load_wan's dit= / vae= / text_encoder= overrides (ComfyUI: original DiT and VAE names,
                transformers umT5 names); a lone DiT file's config comes from its shapes

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
import re

from model.config import PRESETS, WAN_LATENT_MEAN, WAN_LATENT_STD, DiTConfig, T5Config, VAEConfig, WanConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file, the keys and the fix."""


def listing(items, limit: int = 8) -> str:
    """'a, b, c ... and 12 more': error messages stay readable for a 14B model's key list."""
    items = [str(item) for item in items]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_json(path: str) -> dict:
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
        return reader(read_json(path), path, *args)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read the config ({type(error).__name__}: {error})") from error


def _read_wan_config(folder: str) -> dict:
    """The fields of wan_config.json (sub-configs as dataclasses), or {} without one."""
    path = os.path.join(folder, WAN_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    fields = read_json(path)
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(WanConfig)}):
        raise CheckpointError(f"{path}: unknown WanConfig fields {listing(unknown)}")
    try:
        for name, cls in (("dit", DiTConfig), ("vae", VAEConfig), ("t5", T5Config)):
            if name in fields:   # JSON has lists where the dataclasses hold tuples
                fields[name] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields[name].items()})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid {name} config ({error})") from error
    return fields


def _tokenizer_text_len(tokenizer_dir: str) -> int | None:
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    length = read_json(path).get("model_max_length") if os.path.isfile(path) else None
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
                                  f"({listing(diff)}): fix or delete {WAN_CONFIG_FILE}")
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


def read_folder(folder: str) -> tuple[WanConfig, dict[str, str]]:
    """The config and the per-part weight paths of a diffusers or original-layout folder."""
    extra = _read_wan_config(folder)
    join = lambda *names: os.path.join(folder, *names)  # noqa: E731
    original = os.path.isfile(join("config.json")) and read_json(join("config.json")).get("_class_name") == "WanModel"
    if os.path.isfile(join("model_index.json")):
        index = read_json(join("model_index.json"))
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
                              f"{listing(sorted(os.listdir(folder))) or 'nothing'}")
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


def weights_fingerprint(model: str | None, **files: str | None) -> str:
    """A short hash that changes when any weight file of the model changes: caches key on it.

    For each file (a folder's parts, or the single files given by name): its absolute path, size,
    modification time and first 64 KiB (a safetensors header, with every tensor's name, dtype,
    shape and offset). Two checkpoints with the same config, e.g. a fine-tuned 1.3B next to the
    release, get different fingerprints; reading them costs no tensor data.
    """
    paths = [path for path in files.values() if path]
    if model is not None and os.path.isdir(model):
        paths += [path for part, path in read_folder(model)[1].items() if part not in files or not files[part]]
    digest = hashlib.sha256(str(model).encode())
    for path in sorted(set(paths)):
        if path.endswith(".index.json"):     # a sharded part: the index and every shard it names
            shards = set(read_json(path).get("weight_map", {}).values())
            members = [path] + [os.path.join(os.path.dirname(path), shard) for shard in sorted(shards)]
        elif os.path.isdir(path):            # a tokenizer folder
            members = [os.path.join(path, name) for name in sorted(os.listdir(path))]
        else:
            members = [path]
        for member in members:
            if not os.path.isfile(member):
                continue
            stat = os.stat(member)
            digest.update(f"{os.path.abspath(member)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            with open(member, "rb") as f:
                digest.update(f.read(1 << 16))
    return digest.hexdigest()[:16]
