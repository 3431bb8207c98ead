"""Export a Set-and-Sequence adapter as a plain LoRA file for ComfyUI or diffusers.

docs/method.md#lora-parametrization: the delta scale * basis @ (s_id * coeff + s_mot * residual)
is still rank r, so it is exactly a standard LoRA with

    lora_B = scale * basis                     (out, r)
    lora_A = s_id * coeff + s_mot * residual   (r, in)

(with the basis on the input side, the mirror: lora_B = scale * (s_id * coeff + s_mot * residual),
lora_A = basis).

The scale is baked into lora_B and the strengths into lora_A, so every loader must apply the
product with scale 1. No DropConnect is applied: export is the inference-time delta.

export_split keeps the two strengths outside the file: the delta is linear in (s_id, s_mot), so it
writes the identity LoRA (s_id, s_mot) = (1, 0) and the motion LoRA (0, 1) on the same basis, and a
loader that adds two LoRAs with weights a and b (two ComfyUI LoRA loaders, or diffusers'
set_adapters([...], weights=[a, b])) gets exactly the delta at s_id = a, s_mot = b.

Key formats (checked against the loaders' source):
- "comfyui": original Wan module names, `diffusion_model.blocks.N.self_attn.q.lora_A.weight`,
  `.lora_B.weight` and `.alpha`. ComfyUI (comfy/lora.py model_lora_keys_unet) maps
  `diffusion_model.<module>` to every weight of the diffusion model, and its LoRA adapter
  (comfy/weight_adapter/lora.py) reads `<x>.lora_B.weight` as up, `<x>.lora_A.weight` as down and
  scales by `<x>.alpha` / rank; alpha = r gives scale 1. diffusers reads the same file too:
  WanLoraLoaderMixin.lora_state_dict sees the `diffusion_model.` prefix and converts it with
  _convert_non_diffusers_wan_lora_to_diffusers, which also folds alpha / rank (= 1) into the factors.
- "diffusers": peft keys on diffusers module names, `transformer.blocks.N.attn1.to_q.lora_A.weight`.
  WanTransformer3DModel.load_lora_adapter infers r from lora_B and, without alphas or
  `lora_adapter_metadata`, sets lora_alpha = r, so scale 1 again.
Shapes: r rank, in / out the wrapped layer's feature sizes.
"""

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora.lora import DEFAULT_TARGET_PATTERN, lora_modules
from model.files import atomic_path
from model.keymaps import DIT_KEYS


def diffusers_module_name(name: str) -> str:
    """'blocks.3.cross_attn.o' -> 'transformer.blocks.3.attn2.to_out.0': DIT_KEYS maps the layer's weight key."""
    if not DEFAULT_TARGET_PATTERN.fullmatch(name):   # the block linears inject() wraps by default
        raise ValueError(f"export: {name!r} has no diffusers name; the diffusers format covers "
                         "blocks.N.{self_attn.q, self_attn.k, self_attn.v, self_attn.o, cross_attn.q, cross_attn.k, "
                         "cross_attn.v, cross_attn.o, ffn.0, ffn.2}")
    return "transformer." + DIT_KEYS.to_reference(f"{name}.weight").removesuffix(".weight")


@torch.no_grad()
def lora_tensors(model: nn.Module, fmt: str, s_id: float, s_mot: float) -> dict[str, torch.Tensor]:
    """The plain-LoRA tensors of the model's adapters at the given strengths, keyed for `fmt`."""
    if fmt not in ("comfyui", "diffusers"):
        raise ValueError(f"export: fmt must be 'comfyui' or 'diffusers', got {fmt!r}")
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("export: the model has no adapter; call inject(model) and load one first")
    tensors = {}
    for name, m in adapters.items():
        coeff = s_id * m.coeff + s_mot * m.residual          # (r, in); (out, r) with the basis on the input side
        left, right = (m.basis, coeff) if m.basis_side == "output" else (coeff, m.basis)
        lora_b = (m.scale * left).contiguous().cpu()                               # (out, r)
        lora_a = right.contiguous().cpu()                                          # (r, in)
        if fmt == "comfyui":
            prefix = f"diffusion_model.{name}"
            # alpha = r: ComfyUI and diffusers multiply by alpha / r, which must be 1 (scale is in lora_B).
            tensors[f"{prefix}.alpha"] = torch.tensor(float(m.rank))
        else:
            prefix = diffusers_module_name(name)
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
    return tensors


METADATA = {"format": "pt", "source": "set-and-sequence"}


def export_lora(model: nn.Module, path: str, fmt: str, s_id: float = 1.0,
                s_mot: float = 1.0) -> dict[str, torch.Tensor]:
    """Write the model's adapters, strengths baked in, as one plain LoRA safetensors file; returns it."""
    tensors = lora_tensors(model, fmt, s_id, s_mot)
    with atomic_path(path) as tmp:   # a crash never leaves a truncated LoRA under the real name
        save_file(tensors, tmp, metadata=METADATA)
    return tensors


def export_split(model: nn.Module, path: str, fmt: str) -> tuple[str, str]:
    """Write <stem>-identity.safetensors (basis @ coeff) and <stem>-motion.safetensors (basis @ residual)
    beside `path`; returns their paths. Load both and weight them s_id and s_mot."""
    stem = path.removesuffix(".safetensors")
    identity_path, motion_path = f"{stem}-identity.safetensors", f"{stem}-motion.safetensors"
    identity = lora_tensors(model, fmt, s_id=1.0, s_mot=0.0)
    motion = lora_tensors(model, fmt, s_id=0.0, s_mot=1.0)
    # Nested, so an error while saving either file replaces neither: no new half beside an old half.
    with atomic_path(identity_path) as identity_tmp, atomic_path(motion_path) as motion_tmp:
        save_file(identity, identity_tmp, metadata={**METADATA, "part": "identity"})
        save_file(motion, motion_tmp, metadata={**METADATA, "part": "motion"})
    return identity_path, motion_path


def export_files(model: nn.Module, path: str, fmt: str, split: bool, s_id: float, s_mot: float) -> tuple[str, ...]:
    """What train.py --export writes: one file with the strengths baked in, or (--split) the identity and
    motion files, whose strengths are set when they are loaded. Returns the paths written."""
    if split:
        return export_split(model, path, fmt)
    export_lora(model, path, fmt, s_id=s_id, s_mot=s_mot)
    return (path,)
