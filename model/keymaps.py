"""Parameter key maps: our names = original Wan names; this is the one place diffusers/transformers
names are mapped.

Our module names are the ORIGINAL Wan names (blocks.N.self_attn.q, norm3, ffn.0, ...), because the
original and ComfyUI checkpoints and most LoRAs use them (STYLE.md principle 10). diffusers
(WanTransformer3DModel, AutoencoderKLWan) and transformers (UMT5EncoderModel) name the same tensors
differently: three tables of (ours, reference) key templates, read in both directions
(docs/wan.md#key-names). model/loader.py reads with them, model/save.py writes with them,
lora/export.py names diffusers LoRA targets with DIT_KEYS. For example:

  DIT_KEYS.to_ours("blocks.3.attn2.to_out.0.weight")             -> "blocks.3.cross_attn.o.weight"
  vae_keys().to_ours("decoder.up_blocks.1.resnets.0.conv1.weight") -> "decoder.upsamples.4.residual.2.weight"
  T5_KEYS.to_ours("encoder.block.0.layer.1.DenseReluDense.wo.weight") -> "blocks.0.ffn.fc2.weight"

A key no rule covers raises a KeyError naming it (e.g. ComfyUI's scaled-fp8 extras `scaled_fp8`,
`*.scale_weight`, which are not handled).
"""
import re
from functools import lru_cache

from model.config import WanConfig


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


# DiT (docs/wan.md#key-names). The original's parameter-free norm1/norm2/head.norm have no keys.
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

# Wan-VAE (docs/wan.md#key-names). A residual block is one Sequential [norm, SiLU, conv, norm, SiLU, Dropout, conv].
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


# umT5 encoder (docs/wan.md#key-names): layer.0 is the self-attention sublayer, with its own relative-bias table
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


def part_keys(part: str, cfg: WanConfig) -> KeyMap:
    """The table of one part of cfg's model: "dit", "vae" or "text" (the umT5 encoder)."""
    if part == "dit":
        return DIT_KEYS
    return vae_keys(cfg.vae.num_res_blocks, len(cfg.vae.dim_mult)) if part == "vae" else T5_KEYS


# Prefixes that whole-model files put before a part's keys (ComfyUI's checkpoint layout). Keys under the
# part's prefix are taken with it stripped; keys under another part's prefix are left to that part. A
# file without any of them is read as is. Nothing else is ever stripped.
SINGLE_FILE_PREFIXES = {
    "dit": ("model.diffusion_model.", "diffusion_model."),
    "vae": ("vae.", "first_stage_model."),
    "text": ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer."),
}
