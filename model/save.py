"""save_diffusers: write loaded or trained Wan2.1 T2V models as a diffusers WanPipeline folder.

The folder is the layout model/loader.py reads and diffusers' WanPipeline.from_pretrained loads: each
part's weights under the reference's key names (model/keymaps.py), the diffusers / transformers config
files written from our WanConfig (docs/wan.md#presets),
the tokenizer's sentencepiece model and configs, a UniPC scheduler config (docs/wan.md#sigma-grids), and our
wan_config.json (model/checkpoint.py), which diffusers ignores.
"""
import dataclasses
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from model.checkpoint import WAN_CONFIG_FILE
from model.config import WanConfig
from model.keymaps import DIT_KEYS, T5_KEYS, part_keys
from model.loader import WanModels
from model.text_encoder import Tokenizer

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
        # Wan's sampler (docs/wan.md#flow-matching-and-samplers): UniPC on flow-matching sigmas, shifted by the model's sample_shift.
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
            "vae/diffusion_pytorch_model.safetensors": (models.vae, part_keys("vae", cfg)),
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
