"""umT5-XXL text encoder and its sentencepiece tokenizer, as Wan2.1 uses them.

Follows the original Wan code (wan/modules/t5.py `T5Encoder`, `umt5_xxl`; wan/modules/tokenizers.py) and is
numerically the transformers `UMT5EncoderModel` encoder. Parameter names are the ORIGINAL Wan checkpoint keys
(`models_t5_umt5-xxl-enc-bf16.pth`); transformers names are mapped in model/keymaps.py.
umT5 differs from the classic T5 encoder in one way: every layer owns its relative-position bias table.
The tokenizer reproduces transformers' T5Tokenizer with sentencepiece alone, plus Wan's prompt cleaning,
padding and truncation (docs/wan.md#tokenizer).

Shapes: B batch, S text tokens (= text_len once padded), D model width (4096), N heads, d head dim (64).
"""
import html
import json
import math
import os
import re
import sys

import sentencepiece as spm
import torch
import torch.nn as nn
from einops import rearrange

from model.config import T5Config


class RMSNorm(nn.Module):
    """T5LayerNorm: scale by 1/rms(x) and a learned weight; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean square is taken in fp32 even for bf16 weights: squares of bf16 activations lose too much.
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucketing of offsets rel = key - query: exact near 0, log-spaced up to max_distance."""
    half = num_buckets // 2                              # 16 buckets per direction
    bucket = (rel > 0).long() * half                     # keys after the query use the upper half
    dist = rel.abs()
    max_exact = half // 2                                # offsets 0..7 get a bucket each
    # Offsets 8..max_distance share log-spaced buckets 8..15. Same op order as the reference (fp32 log, then
    # truncation) so the bucket edges agree exactly; the clamp only keeps log() away from 0 (unused there).
    log_ratio = torch.log(dist.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    log_bucket = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(dist < max_exact, dist, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned logit offset per (bucket, head); umT5 keeps one table per layer (classic T5 shares layer 0's)."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, seq_len: int) -> torch.Tensor:
        pos = torch.arange(seq_len, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]                                      # (S, S) key - query
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_distance))  # (S, S, N)
        return rearrange(bias, "q k n -> 1 n q k")                             # (1, N, S, S)


class Attention(nn.Module):
    """Bidirectional self-attention without biases and without 1/sqrt(d) scaling (T5 folds it into the init)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.v = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.o = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b s (n d) -> b n s d", n=self.num_heads)   # (B, N, S, d)
        k = rearrange(self.k(x), "b s (n d) -> b n s d", n=self.num_heads)
        v = rearrange(self.v(x), "b s (n d) -> b n s d", n=self.num_heads)
        # Logits, bias and softmax in fp32 as in the original (bf16 logits of 64-dim dots are too coarse).
        logits = torch.einsum("bnqd,bnkd->bnqk", q, k).float() + pos_bias.float()  # (B, N, S, S)
        # Padded keys are never attended to; finfo.min instead of -inf keeps an all-masked row NaN-free.
        logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
        out = logits.softmax(dim=-1).to(v.dtype) @ v                          # (B, N, S, d)
        return self.o(rearrange(out, "b n s d -> b s (n d)"))                 # (B, S, D)


class GatedFeedForward(nn.Module):
    """Gated-GELU FFN: fc2(gelu_tanh(gate(x)) * fc1(x)), all without biases."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        # A Sequential only so the checkpoint key is the original `ffn.gate.0.weight`.
        self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gate(x) * self.fc1(x))   # (B, S, ffn_dim) -> (B, S, D)


class EncoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1 x), then x + ffn(norm2 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedFeedForward(cfg.dim, cfg.ffn_dim)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # The residual stream stays in the weight dtype (bf16 for the released checkpoint), as in the original.
        x = x + self.attn(self.norm1(x), self.pos_embedding(x.shape[1]), key_mask)  # (B, S, D)
        return x + self.ffn(self.norm2(x))                                           # (B, S, D)


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: token embedding, cfg.num_layers blocks, final RMSNorm."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList([EncoderBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        # PyTorch's default init here: Wan's umT5 is always loaded from its checkpoint. Only the toy
        # model trains one from scratch (toy/pretrain.py), after calling init_weights().

    @torch.no_grad()
    def init_weights(self):
        """T5's own init (Raffel et al.; transformers T5PreTrainedModel._init_weights, factor 1)."""
        cfg = self.cfg
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for block in self.blocks:
            nn.init.normal_(block.attn.q.weight, std=(cfg.dim * cfg.head_dim) ** -0.5)  # the 1/sqrt(d) lives here
            for linear in (block.attn.k, block.attn.v, block.ffn.gate[0], block.ffn.fc1):
                nn.init.normal_(linear.weight, std=cfg.dim ** -0.5)
            nn.init.normal_(block.attn.o.weight, std=(cfg.num_heads * cfg.head_dim) ** -0.5)
            nn.init.normal_(block.ffn.fc2.weight, std=cfg.ffn_dim ** -0.5)
            nn.init.normal_(block.pos_embedding.embedding.weight, std=cfg.dim ** -0.5)
        # RMSNorm weights stay 1, from their constructors.

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, S) long, mask (B, S) 1 on real tokens -> (B, S, D) in the weight dtype, padded rows zero."""
        key_mask = mask.bool()                        # (B, S)
        x = self.token_embedding(ids)                 # (B, S, D)
        for block in self.blocks:
            x = block(x, key_mask)                    # (B, S, D)
        x = self.norm(x)
        # Wan keeps out[:seq_len] and the DiT zero-pads back to text_len; zeroing here is the same tensor.
        return x.masked_fill(~key_mask[..., None], 0.0)


# ---- Tokenizer ----

def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: unescape HTML twice, strip, collapse whitespace runs to one space."""
    # The original first runs ftfy.fix_text; ftfy is not a runtime dependency here. It is a no-op on clean text
    # but would also straighten curly quotes, expand ligatures and repair mojibake, so such prompts can differ.
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """Sentencepiece-only reproduction of the HF T5 tokenizer with Wan's cleaning, padding and truncation."""

    def __init__(self, path: str, text_len: int):
        """path: a tokenizer folder holding spiece.model (diffusers `tokenizer/`, original `google/umt5-xxl/`)
        or the .model file itself."""
        model_file = path if path.endswith(".model") else os.path.join(path, "spiece.model")
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.text_len = text_len
        # HF splits on whitespace and prepends "▁" to every chunk; sentencepiece does the same only with
        # add_dummy_prefix and remove_extra_whitespaces on (true for T5, mT5 and umT5 models).
        pieces = self.sp.encode(" x  x ", out_type=str)
        if pieces != self.sp.encode("x x", out_type=str) or not pieces[0].startswith("▁"):
            raise ValueError(f"Tokenizer: {model_file} needs add_dummy_prefix and remove_extra_whitespaces")

        # The sentinel ids live in tokenizer_config.json next to spiece.model (absent: T5Tokenizer defaults).
        config_file = os.path.join(os.path.dirname(model_file), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        self.special_ids = self._special_tokens(config)        # literal string -> id
        self.eos_id, self.pad_id = self.special_ids["</s>"], self.special_ids["<pad>"]
        self.vocab_size = max(len(self.sp), max(self.special_ids.values()) + 1)
        # HF finds special tokens leftmost-longest in the raw text; longest-first alternation does the same.
        tokens = sorted(self.special_ids, key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")

    def _special_tokens(self, config: dict) -> dict[str, int]:
        """Strings HF matches literally in a prompt: sentencepiece control and unk pieces, plus added tokens."""
        sp = self.sp
        # Like HF's sentencepiece import; user-defined pieces are left to sentencepiece (HF splits them out).
        special = {sp.id_to_piece(i): i for i in range(len(sp)) if sp.is_control(i) or sp.is_unknown(i)}
        added = config.get("added_tokens_decoder")
        if added is not None:
            # The real umT5 config lists <pad> </s> <s> <unk> and <extra_id_0..299> with explicit ids.
            for token_id, token in added.items():
                if token.get("single_word") or token.get("normalized"):
                    raise ValueError(f"Tokenizer: added token {token['content']!r} is single_word/normalized; "
                                     "only raw-text matching is reproduced")
                special[token["content"]] = int(token_id)
        else:
            # T5Tokenizer's default: `extra_ids` sentinels appended after the sentencepiece vocab, in reverse
            # order (<extra_id_0> gets the last id).
            num_extra = config.get("extra_ids", 100)
            special.update({f"<extra_id_{i}>": len(sp) + num_extra - 1 - i for i in range(num_extra)})
        return special

    def encode(self, text: str) -> list[int]:
        """Ids of one (already cleaned) text plus the closing </s>, untruncated, as HF add_special_tokens=True."""
        ids = []
        for chunk in self.special_pattern.split(text):     # odd positions are the matched special tokens
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
            elif chunk:
                # Each chunk gets its own dummy "▁" prefix, as HF's Metaspace(prepend_scheme="always") does.
                ids.extend(self.sp.encode(chunk))
        return ids + [self.eos_id]

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, text_len) long, mask (B, text_len) long; the mask is 1 on real tokens incl. </s>."""
        ids = torch.full((len(prompts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.text_len), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(clean_prompt(prompt))
            if len(tokens) > self.text_len:                 # truncate the text but keep </s> last
                print(f"warning: the prompt {prompt!r} is {len(tokens)} tokens, the text encoder reads "
                      f"{self.text_len}: the rest is cut", file=sys.stderr)
                tokens = tokens[:self.text_len - 1] + [self.eos_id]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1                     # by length: a literal "<pad>" in a prompt is real
        return ids, mask


@torch.no_grad()
def encode_prompts(tokenizer: Tokenizer, encoder: UMT5Encoder, prompts: list[str],
                   device: torch.device) -> torch.Tensor:
    """prompts -> (B, text_len, D) text states for the DiT, zero past each prompt's </s>."""
    ids, mask = tokenizer(prompts)
    return encoder(ids.to(device), mask.to(device))
