"""The Set-and-Sequence LoRA: a shared identity basis, identity coefficients, a motion residual.

Follows docs/method.md#lora-parametrization (paper Eq. 2, 3, 6) and docs/method.md#regularization,
item 1 (Eq. 10). For a frozen linear layer y = W x, W of shape (out, in):

    stage "set":       W' = W + scale * basis @ coeff
    stage "sequence":  W' = W + scale * basis @ (coeff + residual)
    inference:         W' = W + scale * basis @ (s_id * coeff + s_mot * residual)

with basis (out, r) = the paper's A1, coeff (r, in) = B1, residual (r, in) = B2, scale = alpha / r.
The basis is the OUTPUT-side factor (docs/method.md#decisions), so it plays the role of a standard
LoRA's lora_B and coeff + residual the role of lora_A. The other reading of the paper, the basis
on the INPUT side (basis_side="input": delta = scale * (coeff + residual) @ basis, basis (r, in),
coeff and residual (out, r)), is kept as an option so eval.py can compare the two.

This file holds the module, its injection into a DiT (original Wan module names: blocks.N.self_attn.q,
..., blocks.N.ffn.2), the stage switch (which tensors train, which get DropConnect) and the
safetensors save / strict load of the adapter tensors.
Shapes: r rank, in / out the wrapped layer's feature sizes, "..." any leading dims (B, L).
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.files import atomic_path
from model.fp8 import FP8Linear

FORMAT_VERSION = 1
BASIS_SIDES = ("output", "input")   # docs/method.md#decisions: output (a file without the key is "output")
# DropConnect probability per stage (docs/method.md#regularization 1: 0.8 in Set, 0.5 in Sequence).
DEFAULT_DROP = {"set": 0.8, "sequence": 0.5, "eval": 0.0}
# Every linear of every DiT block (docs/method.md#decisions, as the common Wan LoRA trainers do).
DEFAULT_TARGET_PATTERN = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])")


def drop_connect(weight: torch.Tensor, p: float) -> torch.Tensor:
    """Eq. 10: zero each ENTRY of the matrix with probability p, scale the rest by 1/(1-p)."""
    # Inverted scaling keeps E[mask * w] = w, so inference uses the plain matrix (docs/method.md#decisions).
    # The mask comes from the global torch RNG of the weight's device: seeded once by the training
    # script, it is reproducible run to run, and a fresh mask is drawn on every forward.
    # That is dropout applied to the weight's entries instead of the activations (DropConnect, Wan et
    # al. 2013), so F.dropout does it: a Bernoulli(1 - p) keep mask and the 1/(1-p) scale in one kernel.
    return F.dropout(weight, p, training=True)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus scale * basis @ (s_id * coeff + s_mot * residual) (or the input-side mirror)."""

    def __init__(self, base: nn.Linear | FP8Linear, rank: int, alpha: float, basis_side: str = "output"):
        super().__init__()
        if basis_side not in BASIS_SIDES:
            raise ValueError(f"LoRALinear: basis_side must be one of {BASIS_SIDES}, got {basis_side!r}")
        out_dim, in_dim = base.weight.shape
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.basis_side = basis_side
        # Adapter tensors are fp32 whatever the base dtype: AdamW updates them, and a bf16 copy
        # would round away steps of lr=1e-4. The forward casts them to the activation dtype.
        device, fp32 = base.weight.device, torch.float32
        # A1, output side / B1, input side / B2, the motion residual on the coefficients.
        self.basis = nn.Parameter(torch.zeros(out_dim, rank, device=device, dtype=fp32))
        self.coeff = nn.Parameter(torch.empty(rank, in_dim, device=device, dtype=fp32))
        self.residual = nn.Parameter(torch.zeros(rank, in_dim, device=device, dtype=fp32))
        # The zero goes on the basis because it is the output-side factor (docs/method.md#decisions), the
        # place of a standard LoRA's zero lora_B: the delta is exactly 0 at init, yet the basis gets
        # a gradient at step 0 (it sees coeff @ x, coeff random): stage "set" starts exactly as a
        # standard LoRA (the single-stage baseline) does. The residual starts at zero too, so at the
        # start of stage "sequence" the model equals the stage-"set" model, and the residual still
        # gets a gradient through the now-trained basis.
        nn.init.kaiming_uniform_(self.coeff, a=math.sqrt(5))  # nn.Linear's / peft's lora_A init
        if basis_side == "input":
            # The mirror: the basis is the input-side factor, so it takes lora_A's random init and the
            # coefficients lora_B's zero (the residual is zero either way): still an exact no-op at init.
            self.basis = nn.Parameter(torch.empty(rank, in_dim, device=device, dtype=fp32))
            self.coeff = nn.Parameter(torch.zeros(out_dim, rank, device=device, dtype=fp32))
            self.residual = nn.Parameter(torch.zeros(out_dim, rank, device=device, dtype=fp32))
            nn.init.kaiming_uniform_(self.basis, a=math.sqrt(5))
        # Inference strengths of identity and motion (docs/method.md#the-two-stages-and-inference); 1.0 while training.
        self.s_id = 1.0
        self.s_mot = 1.0
        # Set by set_stage(): which matrix DropConnect masks, and with which probability.
        self.stage = "eval"
        self.p = 0.0

    def effective_coeff(self) -> torch.Tensor:
        """The (r, in) right factor of the delta ((out, r) left one, input side), with DropConnect when training."""
        coeff, residual = self.coeff, self.residual
        if self.training and self.p > 0:
            if self.stage == "set":
                coeff = drop_connect(coeff, self.p)        # stage 1 regularizes the identity coefficients
            elif self.stage == "sequence":
                residual = drop_connect(residual, self.p)  # stage 2: only the trainable residual
        return torch.add(self.s_id * coeff, residual, alpha=self.s_mot)   # s_id*coeff + s_mot*residual (r, in)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (out, r), right (r, in)) with delta W = scale * left @ right, whichever side the basis is on."""
        if self.basis_side == "output":
            return self.basis, self.effective_coeff()
        return self.effective_coeff(), self.basis

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) update; for tests and inspection only, training never builds it."""
        left, right = self.factors()
        return self.scale * left @ right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The frozen layer computes in its weight's dtype; an fp8 one in the dtype it upcasts to (model/fp8.py).
        base_dtype = self.base.compute_dtype if isinstance(self.base, FP8Linear) else self.base.weight.dtype
        y = self.base(x.to(base_dtype))                         # (..., out), the frozen layer
        # Two thin matmuls through the rank-r bottleneck instead of materializing W' (out, in).
        # The scale multiplies the rank-r bottleneck h, not the (..., out) output: the same product
        # with an r-wide elementwise pass instead of a full-width one (and its backward).
        left, right = self.factors()                            # (out, r), (r, in)
        h = self.scale * F.linear(x, right.to(x.dtype))         # (..., r)
        delta = F.linear(h, left.to(x.dtype))                   # (..., out)
        # The sum is taken in fp32: a trained delta is ~1e-3 of y, about bf16's rounding step, so
        # y + delta in bf16 would lose much of it. So the output is fp32 even for a bf16 base.
        return y.float() + delta.float()                        # (..., out) fp32

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, basis_side={self.basis_side}, stage={self.stage}, p={self.p}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every injected LoRALinear of the model, by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def default_targets(model: nn.Module) -> list[str]:
    """Names of every block's self_attn q/k/v/o, cross_attn q/k/v/o, ffn.0 and ffn.2 linear."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, FP8Linear)) and DEFAULT_TARGET_PATTERN.fullmatch(name)]


def inject(model: nn.Module, targets: list[str] | None = None, rank: int = 8,
           alpha: float | None = None, basis_side: str = "output") -> list[str]:
    """Replace each target nn.Linear or FP8Linear (full module name) by a LoRALinear; returns the targets."""
    if rank < 1:
        raise ValueError(f"inject: rank must be >= 1, got {rank}")
    alpha = float(rank) if alpha is None else float(alpha)  # default scale alpha / r = 1
    targets = default_targets(model) if targets is None else list(targets)
    if not targets:
        raise ValueError("inject: no target layers (the model has no blocks.N.self_attn/cross_attn/ffn linears)")
    # Check every name before replacing anything, so a typo leaves the model untouched.
    modules = dict(model.named_modules())
    for name in targets:
        if name not in modules:
            raise ValueError(f"inject: target {name!r} is not a module of the model")
        if isinstance(modules[name], LoRALinear):
            raise ValueError(f"inject: target {name!r} already has an adapter")
        if type(modules[name]) not in (nn.Linear, FP8Linear):
            raise ValueError(f"inject: target {name!r} is a {type(modules[name]).__name__}, "
                             "not an nn.Linear or FP8Linear")
    for name in targets:
        replace_module(model, name, LoRALinear(modules[name], rank, alpha, basis_side))
    return targets


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the submodule at the full name `name`."""
    parent_name, _, child = name.rpartition(".")
    # setattr also works inside nn.Sequential (ffn.0): its children are named "0", "1", ...
    setattr(model.get_submodule(parent_name), child, module)


def set_stage(model: nn.Module, stage: str, p: float | None = None) -> None:
    """Freeze everything, then unfreeze the stage's tensors and set its DropConnect probability."""
    if stage not in DEFAULT_DROP:
        raise ValueError(f"set_stage: stage must be one of {list(DEFAULT_DROP)}, got {stage!r}")
    p = DEFAULT_DROP[stage] if p is None else p
    if not 0.0 <= p < 1.0:
        raise ValueError(f"set_stage: drop probability must be in [0, 1), got {p}")
    if stage == "eval" and p != 0.0:
        raise ValueError("set_stage: stage 'eval' trains nothing, so it takes no drop probability")
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("set_stage: the model has no adapter; call inject(model) first")
    model.requires_grad_(False)  # base weights stay frozen in every stage
    for m in adapters.values():
        m.stage, m.p = stage, p
        if stage == "set":
            # Stage 1 (Set): identity basis and coefficients learn from unordered frames.
            m.basis.requires_grad_(True)
            m.coeff.requires_grad_(True)
        elif stage == "sequence":
            # Stage 2 (Sequence): the basis and coeff are frozen, so motion must live in their span.
            m.residual.requires_grad_(True)
    # DropConnect also needs training mode (model.train()); the caller owns train/eval mode.


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold each adapter on an fp32 base into its weight (W += delta at the current s_id / s_mot), unwrap it.

    Adapters on bf16 and fp8 (model/fp8.py) bases stay unmerged: a trained delta's entries (rms 4e-5 to
    4e-4) lie near the bf16 rounding step of W's (1.2e-4 for |w| ~ 2e-2), so W + delta in bf16 would lose
    8-61% of it (and fp8's step is 16 times bf16's).
    """
    # Inference only: the merged model runs at the base model's speed, and a second adapter can
    # then be injected and merged on top (several concepts at once, each with its own strengths).
    for name, m in lora_modules(model).items():
        if m.base.weight.dtype == torch.float32:
            m.eval()  # no DropConnect in the merged delta
            m.base.weight += m.delta_weight()
            replace_module(model, name, m.base)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require grad, by name: what the optimizer must get, nothing more."""
    # Passing only these to AdamW matters: its weight decay would shrink any tensor it holds.
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


# ---- save / load: only the adapter tensors, with what is needed to check a later load ----
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """basis / coeff / residual of every adapter, keyed '<module name>.basis' etc."""
    return {f"{name}.{tensor}": getattr(m, tensor).detach()
            for name, m in lora_modules(model).items() for tensor in ("basis", "coeff", "residual")}


def adapter_hyperparameters(model: nn.Module) -> tuple[int, float, str, list[str]]:
    """(rank, alpha, basis_side, targets) shared by all adapters of the model."""
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("the model has no adapter; call inject(model) first")
    shared = {(m.rank, m.alpha, m.basis_side) for m in adapters.values()}
    if len(shared) > 1:
        raise ValueError(f"adapters with different (rank, alpha, basis side) in one model: {sorted(shared)}")
    (rank, alpha, side), = shared
    return rank, alpha, side, list(adapters)


def save_adapter(path: str, model: nn.Module, meta: dict) -> None:
    """Write the adapter tensors and JSON metadata to a safetensors file, atomically."""
    # meta must say which base model and stage this is; it may add prompts, tokens, config, ...
    for key in ("base_model_id", "stage"):
        if key not in meta:
            raise ValueError(f"save_adapter: meta needs a {key!r} entry")
    rank, alpha, side, targets = adapter_hyperparameters(model)
    header = {"format_version": FORMAT_VERSION, "rank": rank, "alpha": alpha, "basis_side": side,
              "targets": targets}
    clash = sorted(set(header) & set(meta))
    if clash:
        raise ValueError(f"save_adapter: meta may not set {clash}; they are read from the model")
    # safetensors metadata is str -> str: every value is stored as JSON and decoded by load_adapter.
    metadata = {key: json.dumps(value) for key, value in {**header, **meta}.items()}
    tensors = {key: t.contiguous().cpu() for key, t in adapter_state_dict(model).items()}
    with atomic_path(path) as tmp:   # a crash mid-write never leaves a truncated file
        save_file(tensors, tmp, metadata=metadata)


def load_adapter(path: str, model: nn.Module, base_model_id: str) -> dict:
    """Copy a saved adapter into the injected model, strictly; returns the decoded metadata."""
    with safe_open(path, framework="pt") as f:
        raw = f.metadata() or {}
    meta = {key: json.loads(value) for key, value in raw.items()}
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_adapter: {path} has format_version {meta.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}; is it a Set-and-Sequence adapter file?")
    if meta.get("base_model_id") != base_model_id:
        raise ValueError(f"load_adapter: {path} was trained on base model {meta.get('base_model_id')!r}, "
                         f"not {base_model_id!r}; load that base model first")
    rank, alpha, side, targets = adapter_hyperparameters(model)
    file_side = meta.get("basis_side", "output")
    if (meta["rank"], meta["alpha"], file_side) != (rank, alpha, side):
        raise ValueError(f"load_adapter: {path} has rank={meta['rank']}, alpha={meta['alpha']}, "
                         f"basis_side={file_side}, the model was injected with rank={rank}, alpha={alpha}, "
                         f"basis_side={side}; call inject(model, rank={meta['rank']}, alpha={meta['alpha']}, "
                         f"basis_side={file_side!r}) on a fresh model")
    if set(meta["targets"]) != set(targets):
        only_file = sorted(set(meta["targets"]) - set(targets))
        only_model = sorted(set(targets) - set(meta["targets"]))
        raise ValueError(f"load_adapter: target layers differ; only in the file: {only_file}, only in the "
                         f"model: {only_model}; inject(model, targets=<the file's 'targets'>) on a fresh model")
    tensors = load_file(path)
    params = {key: model.get_parameter(key) for key in adapter_state_dict(model)}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"load_adapter: {path} does not match the model's adapter tensors; missing: "
                         f"{missing}, unexpected: {unexpected}; the file is incomplete or from another model")
    for key, param in params.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"load_adapter: {key} has shape {tuple(tensors[key].shape)} in {path}, "
                             f"{tuple(param.shape)} in the model; the base model's sizes differ")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])  # in place: an optimizer holding these tensors stays valid
    return meta


# ---- adapter files as the scripts use them: inject what the file describes, then load it ----
def read_adapter_meta(path: str) -> dict:
    """The decoded metadata of an adapter file; a clear error for a missing or non-adapter file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter {path} does not exist: train one with `python train.py --stage set` "
                                "then `--stage sequence`, or omit --adapter")
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path} is not a safetensors file ({error}); pass the adapter "
                         "(<run-dir>/set.safetensors or sequence.safetensors), not the resume state") from None
    meta = {key: json.loads(value) for key, value in raw.items()}
    if "rank" not in meta or "targets" not in meta:
        raise ValueError(f"{path} is not a Set-and-Sequence adapter (no rank/targets metadata); "
                         "plain LoRA files are for ComfyUI/diffusers")
    return meta


def load_adapter_file(model: nn.Module, path: str, model_id: str) -> dict:
    """Inject adapters shaped like the file's (rank, alpha, targets, basis side), then load it strictly."""
    meta = read_adapter_meta(path)
    missing = [t for t in meta["targets"] if t not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"adapter {path} targets layers this model does not have ({missing[:3]}...): "
                         f"it was trained for {meta.get('base_model_id')!r}, this model is {model_id!r}")
    inject(model, meta["targets"], rank=meta["rank"], alpha=meta["alpha"], basis_side=meta.get("basis_side", "output"))
    load_adapter(path, model, base_model_id=model_id)
    return meta


@torch.no_grad()
def apply_adapters(model: nn.Module, paths: list[str], model_id: str, s_id: float, s_mot: float) -> list[dict]:
    """Load each adapter strictly and apply it at strengths s_id / s_mot for inference; several stack.

    fp32 layers merge each adapter before the next loads. bf16 and fp8 layers keep them unmerged (see merge):
    all adapters of a layer become one LoRALinear whose factors are theirs concatenated along the
    rank, [l1 | l2] @ [r1 ; r2] = l1 @ r1 + l2 @ r2, with each scale and strength folded into l.
    """
    metas, unmerged = [], {}   # layer name -> (left (out, R), right (R, in)) of the adapters so far
    for path in paths:
        metas.append(load_adapter_file(model, path, model_id))
        for m in lora_modules(model).values():
            m.s_id, m.s_mot = s_id, s_mot   # W + s_id * basis@coeff + s_mot * basis@residual
        merge(model)
        for name, m in lora_modules(model).items():   # what merge left: set aside, so the next file can load
            m.eval()
            left, right = m.factors()
            lefts, rights = unmerged.get(name, (left[:, :0], right[:0]))
            unmerged[name] = torch.cat([lefts, m.scale * left], dim=1), torch.cat([rights, right])
            replace_module(model, name, m.base)
    for name, (left, right) in unmerged.items():
        inject(model, [name], rank=left.shape[1], alpha=left.shape[1])   # scale 1: it is in left already
        m = model.get_submodule(name).requires_grad_(False)
        m.basis.copy_(left)                 # residual stays 0 and s_id = s_mot = 1: all is in the factors
        m.coeff.copy_(right)
    return metas
