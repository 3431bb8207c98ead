"""Checkpoint loading: turns a diffusers folder, an original Wan release or ComfyUI single files
into our modules (built on the meta device, loaded strictly).

Our module names are the ORIGINAL Wan names (blocks.N.self_attn.q, cross_attn, ffn.0, norm3, ...),
because original and ComfyUI checkpoints and LoRAs use them; diffusers/transformers names are
mapped here, in one place.
"""
import re


# ---- DiT key map: diffusers WanTransformer3DModel -> ours (= original WanModel) ----
def dit_key_from_diffusers(key: str) -> str:
    raise NotImplementedError  # filled by the DiT work


# ---- VAE key map: diffusers AutoencoderKLWan -> ours (= original WanVAE_) ----
def vae_key_from_diffusers(key: str) -> str:
    raise NotImplementedError  # filled by the VAE work


# ---- umT5 key map: transformers UMT5EncoderModel -> ours (= original T5Encoder) ----
def t5_key_from_transformers(key: str) -> str:
    raise NotImplementedError  # filled by the text-encoder work
