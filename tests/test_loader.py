"""model/loader.py (with checkpoint.py, keymaps.py, save.py): every checkpoint layout loads to the same
modules as the reference libraries, bad checkpoints fail with clear messages before any tensor is read,
and save_diffusers round-trips.

Tiny preset models with random weights; the references are diffusers (WanTransformer3DModel,
AutoencoderKLWan, single-file loaders, WanPipeline) and transformers (UMT5EncoderModel, T5Tokenizer).
"""
import copy
import dataclasses
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file, save_file
from transformers import UMT5EncoderModel

import model.loader as loader
import model.save as save
from model.checkpoint import CheckpointError, config_from_dit_shapes
from model.config import PRESETS
from model.dit import WanDiT
from model.keymaps import DIT_KEYS, T5_KEYS, vae_keys
from model.loader import WanModels, load_part, load_wan
from model.save import save_diffusers
from model.text_encoder import Tokenizer, UMT5Encoder, clean_prompt
from model.vae import WanVAE
from test_dit import diffusers_config, randomize_
from test_text_encoder import hf_config

TINY = PRESETS["tiny"]
PROMPTS = ["a cat runs on the beach", "", "kari tome nasu lopede " * 4, "a dog <extra_id_0> on the beach"]


def train_tokenizer(folder: Path) -> None:
    """A ~100-piece T5-layout sentencepiece model (pad 0, eos 1, unk 2, 3 sentinels): fits the tiny umT5's 256 rows."""
    rng = random.Random(0)
    syllables = "ka ri to me na su lo pe de va mi zu".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(100)]
    words += "a cat dog runs on the beach".split()
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=100,
                                   model_type="unigram", character_coverage=1.0, minloglevel=2,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    # model_max_length is how a diffusers folder tells the loader a short text_len (the tiny preset's 16)
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 3, "model_max_length": TINY.t5.text_len}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@torch.no_grad()
def random_diffusers_vae(cfg) -> AutoencoderKLWan:
    """A diffusers VAE of our config with every parameter perturbed (gammas away from 1, so a dropped norm shows)."""
    vae = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                           num_res_blocks=cfg.num_res_blocks, attn_scales=[],
                           temperal_downsample=list(cfg.temporal_downsample),
                           latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std)).eval()
    for p in vae.parameters():
        p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random tiny diffusers DiT, VAE and transformers umT5 in a diffusers WanPipeline folder (DiT, umT5 sharded)."""
    folder = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    dit = WanTransformer3DModel(**diffusers_config(TINY.dit)).eval()
    randomize_(dit, seed=1)
    vae = random_diffusers_vae(TINY.vae)
    t5 = UMT5EncoderModel(hf_config(TINY.t5)).eval()
    with torch.no_grad():
        for name, p in t5.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "layer_norm" in name else 0.25 * torch.randn_like(p))
    dit.save_pretrained(folder / "transformer", max_shard_size="20KB")     # forces shards + index
    vae.save_pretrained(folder / "vae")
    t5.save_pretrained(folder / "text_encoder", max_shard_size="20KB")
    train_tokenizer(folder / "tokenizer")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=TINY.sample_shift).save_pretrained(folder / "scheduler")
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return SimpleNamespace(folder=folder, dit=dit, vae=vae, t5=t5)


@pytest.fixture(scope="module")
def loaded(reference):
    """Our three modules and tokenizer, loaded from the diffusers folder."""
    return load_wan(str(reference.folder))


@torch.no_grad()
def assert_same_outputs(models, dit, vae, t5) -> None:
    """Our DiT / VAE / umT5 give the reference modules' outputs (DiT rel 1e-5, VAE 1e-4, umT5 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, TINY.dit.in_dim, 2, 4, 6, generator=gen), torch.tensor([999.0, 250.5])
    context = torch.randn(2, TINY.dit.text_len, TINY.dit.text_dim, generator=gen)
    context[0, 7:] = 0                                   # one short prompt, zero-padded as the pipeline does
    expected = dit(x, t, context, return_dict=False)[0]
    rel = ((models.dit(x, t, context) - expected).abs().max() / expected.abs().max()).item()
    video = torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1
    mean = models.vae.moments(video)[0]
    mean_diff = (mean - vae.encode(video).latent_dist.mean).abs().max().item()
    decoded = vae.decode(mean).sample
    assert (decoded.abs() < 1).float().mean() > 0.5, "most pixels must be unclamped for a meaningful check"
    decode_diff = (models.vae.decode_raw(mean) - decoded).abs().max().item()
    ids, mask = models.tokenizer(PROMPTS)
    real = mask.bool()
    t5_diff = (models.text_encoder(ids, mask)[real] - t5(input_ids=ids, attention_mask=mask).last_hidden_state[real])
    t5_diff = t5_diff.abs().max().item()
    print(f"DiT rel {rel:.2e}, VAE mean {mean_diff:.2e} decode {decode_diff:.2e}, umT5 {t5_diff:.2e}")
    assert rel <= 1e-5 and mean_diff <= 1e-4 and decode_diff <= 1e-4 and t5_diff <= 1e-5


def state_dicts_equal(a: torch.nn.Module, b: dict) -> bool:
    ours = a.state_dict()
    return ours.keys() == b.keys() and all(torch.equal(ours[k], b[k]) for k in ours)


def test_diffusers_folder_matches_diffusers(reference, loaded):
    """A sharded diffusers folder loads to the tiny preset (text_len from the tokenizer) with diffusers' outputs."""
    assert loaded.cfg == TINY and loaded.model_id == "tiny"
    assert not any(p.is_meta or p.dtype != torch.float32 for m in (loaded.dit, loaded.vae, loaded.text_encoder)
                   for p in m.parameters())
    assert_same_outputs(loaded, reference.dit, reference.vae, reference.t5)


def test_original_layout_matches_diffusers_single_file(reference, loaded, tmp_path):
    """The original release layout (sharded DiT, VAE and bf16 umT5 .pth) equals diffusers' single-file loaders."""
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    dit_state = loaded.dit.state_dict()
    keys = sorted(dit_state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_file({k: dit_state[k] for k in shard_keys}, folder / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    d = TINY.dit   # the release's config.json omits text_dim (4096 by default); the tiny model needs it
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": d.dim,
        "eps": d.eps, "ffn_dim": d.ffn_dim, "freq_dim": d.freq_dim, "in_dim": d.in_dim, "num_heads": d.num_heads,
        "num_layers": d.num_layers, "out_dim": d.out_dim, "text_len": d.text_len, "text_dim": d.text_dim}))
    # diffusers' single-file VAE converter hard-codes the release's layout (2 residual blocks per stage,
    # shortcuts where dim_mult (1, 2, 4, 4) changes width), so this VAE is the release's at base_dim 8;
    # ours, loaded from its diffusers save, gives the original-name file.
    vae_cfg = dataclasses.replace(TINY.vae, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    random_diffusers_vae(vae_cfg).save_pretrained(tmp_path / "vae_reference" / "vae")
    vae_ours = load_part("vae", str(tmp_path / "vae_reference" / "vae" / "diffusion_pytorch_model.safetensors"),
                         dataclasses.replace(TINY, vae=vae_cfg))
    torch.save(vae_ours.state_dict(), folder / "Wan2.1_VAE.pth")
    t5_bf16 = {k: v.to(torch.bfloat16) for k, v in loaded.text_encoder.state_dict().items()}
    torch.save(t5_bf16, folder / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(reference.folder / "tokenizer", folder / "google" / "umt5-xxl")
    # the release has no VAE / umT5 config: wan_config.json (our extension) supplies the tiny ones
    wan_config = {"vae": dataclasses.asdict(vae_cfg), "t5": dataclasses.asdict(TINY.t5)}
    (folder / "wan_config.json").write_text(json.dumps(wan_config))

    ours = load_wan(str(folder))
    # the original hard-codes 1024 RoPE rows: the only config difference, and no tensor depends on it
    assert ours.cfg.dit == dataclasses.replace(TINY.dit, rope_max_len=1024)
    assert (ours.cfg.vae, ours.cfg.t5) == (vae_cfg, TINY.t5)
    # Independent converters: diffusers' own original->diffusers single-file loaders on the same files.
    merged = {k: v for name in shards for k, v in load_file(folder / name).items()}
    dit = WanTransformer3DModel.from_single_file(merged, config=str(reference.folder), subfolder="transformer")
    vae = AutoencoderKLWan.from_single_file(str(folder / "Wan2.1_VAE.pth"), config=str(tmp_path / "vae_reference"),
                                            subfolder="vae")
    t5 = copy.deepcopy(reference.t5)   # transformers has no single-file loader: the reference, rounded to bf16
    with torch.no_grad():
        for p in t5.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    assert_same_outputs(ours, dit.eval(), vae.eval(), t5)


def test_comfyui_single_files(reference, loaded, tmp_path):
    """ComfyUI files (prefixed bf16/fp16 DiT, fp16 VAE, bf16 umT5 in transformers names) load to the rounded weights."""
    vae_file, t5_file = tmp_path / "wan_2.1_vae.safetensors", tmp_path / "umt5_xxl_bf16.safetensors"
    save_file({k: v.half() for k, v in loaded.vae.state_dict().items()}, vae_file)
    # transformers' own names, with the tied embedding stored twice as state_dict() lists it
    t5_state = {k: v.to(torch.bfloat16) for k, v in reference.t5.state_dict().items()}
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= t5_state.keys()
    save_file({k: v.contiguous().clone() for k, v in t5_state.items()}, t5_file)
    dit_files = {torch.bfloat16: tmp_path / "dit_bf16.safetensors", torch.float16: tmp_path / "dit_fp16.safetensors"}
    for dtype, dit_file in dit_files.items():
        save_file({"model.diffusion_model." + k: v.to(dtype) for k, v in loaded.dit.state_dict().items()}, dit_file)
        models = load_wan("tiny", dit=str(dit_file), vae=str(vae_file), text_encoder=str(t5_file),
                          tokenizer=str(reference.folder / "tokenizer"))
        assert models.model_id == "tiny"
        assert state_dicts_equal(models.dit, {k: v.to(dtype).float() for k, v in loaded.dit.state_dict().items()})
        assert state_dicts_equal(models.vae, {k: v.half().float() for k, v in loaded.vae.state_dict().items()})
        rounded_t5 = {k: v.to(torch.bfloat16).float() for k, v in loaded.text_encoder.state_dict().items()}
        assert state_dicts_equal(models.text_encoder, rounded_t5)
    # loading in the file's own dtype keeps the stored tensors bit for bit
    as_bf16 = load_wan("tiny", parts=("dit",), dit=str(dit_files[torch.bfloat16]), dtype=torch.bfloat16)
    assert state_dicts_equal(as_bf16.dit, {k: v.to(torch.bfloat16) for k, v in loaded.dit.state_dict().items()})
    # an override replaces one part of a folder
    mixed = load_wan(str(reference.folder), parts=("dit",), dit=str(dit_files[torch.float16]))
    assert mixed.vae is None and mixed.text_encoder is None
    assert state_dicts_equal(mixed.dit, {k: v.half().float() for k, v in loaded.dit.state_dict().items()})


def test_whole_checkpoint_file_prefixes(loaded, reference, tmp_path):
    """One file holding every part under ComfyUI's checkpoint prefixes serves dit=, vae= and text_encoder=."""
    whole = {"model.diffusion_model." + k: v for k, v in loaded.dit.state_dict().items()}
    whole |= {"vae." + k: v for k, v in loaded.vae.state_dict().items()}
    whole |= {"text_encoders.umt5xxl.transformer." + T5_KEYS.to_reference(k): v
              for k, v in loaded.text_encoder.state_dict().items()}
    path = str(tmp_path / "wan_whole.safetensors")
    save_file(whole, path)
    models = load_wan("tiny", dit=path, vae=path, text_encoder=path, tokenizer=str(reference.folder / "tokenizer"))
    for ours, original in ((models.dit, loaded.dit), (models.vae, loaded.vae),
                           (models.text_encoder, loaded.text_encoder)):
        assert state_dicts_equal(ours, original.state_dict())


def test_release_preset_inferred_from_dit_shapes():
    """A lone DiT file's width picks the 1.3B or 14B preset and its keys the block count; other widths refuse."""
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanDiT(PRESETS[name].dit).state_dict().items()}
        assert config_from_dit_shapes(shapes, "file") == PRESETS[name]
    with pytest.raises(CheckpointError, match="dim 24 is neither Wan2.1 1.3B"):
        config_from_dit_shapes({"patch_embedding.weight": (24, 4, 1, 2, 2)}, "file")


def _dit_file(tmp_path: Path, state: dict) -> dict:
    path = tmp_path / "dit.safetensors"
    save_file(state, path)
    return {"model": "tiny", "parts": ("dit",), "dit": str(path)}


def _folder_copy(tmp_path: Path, reference) -> Path:
    return Path(shutil.copytree(reference.folder, tmp_path / "copy"))


def _missing_shard(tmp_path, reference, loaded):
    folder = _folder_copy(tmp_path, reference)
    (folder / "transformer" / "diffusion_pytorch_model-00002-of-00006.safetensors").unlink()
    return {"model": str(folder)}


def _truncated_file(tmp_path, reference, loaded):
    folder = _folder_copy(tmp_path, reference)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return {"model": str(folder)}


def _wrong_shape(tmp_path, reference, loaded):
    state = loaded.dit.state_dict()
    return _dit_file(tmp_path, state | {"patch_embedding.weight": torch.zeros(5120, 4, 1, 2, 2)})


def _unknown_key(tmp_path, reference, loaded):
    return _dit_file(tmp_path, loaded.dit.state_dict() | {"blocks.0.cross_attn.k_img.weight": torch.zeros(24, 24)})


def _missing_key(tmp_path, reference, loaded):
    return _dit_file(tmp_path, {k: v for k, v in loaded.dit.state_dict().items() if k != "head.head.bias"})


def _not_a_checkpoint(tmp_path, reference, loaded):
    (tmp_path / "notes.txt").write_text("hello")
    return {"model": str(tmp_path)}


@pytest.mark.parametrize("make, error, message", [
    (_missing_shard, CheckpointError, r"shard diffusion_pytorch_model-00002-of-00006.safetensors listed in "
                                      r".*transformer/diffusion_pytorch_model.safetensors.index.json is missing: "
                                      r"re-download"),
    (_truncated_file, CheckpointError, r"vae/diffusion_pytorch_model.safetensors is truncated or corrupt"),
    (_wrong_shape, CheckpointError, r"1 tensors with the wrong shape: patch_embedding.weight \[5120, 4, 1, 2, 2\] "
                                    r"\(model: \[24, 4, 1, 2, 2\]\)(.|\n)*the checkpoint is the 14B model"),
    (_unknown_key, CheckpointError, r"1 unexpected keys: blocks.0.cross_attn.k_img.weight(.|\n)*extra layers"),
    (_missing_key, CheckpointError, r"1 missing keys: head.head.bias\n(.|\n)*incomplete"),
    (_not_a_checkpoint, CheckpointError, r"is neither a diffusers Wan folder .* it holds notes.txt"),
    (lambda tmp_path, *_: {"model": str(tmp_path / "nowhere")}, FileNotFoundError, "neither an existing folder"),
    (lambda tmp_path, *_: {"model": "tiny", "dit": str(tmp_path / "no.safetensors")}, FileNotFoundError,
     r"dit=.*no.safetensors does not exist"),
])
def test_bad_checkpoints_raise_before_reading_tensors(make, error, message, reference, loaded, tmp_path, monkeypatch):
    """Each broken checkpoint raises a message naming file, keys and fix, before any tensor is read."""
    kwargs = make(tmp_path, reference, loaded)

    def no_tensor_reads(*args):
        raise AssertionError("a tensor was read before the checkpoint was checked")
    monkeypatch.setattr(loader.WeightFile, "read", no_tensor_reads)
    with pytest.raises(error, match=message) as info:
        load_wan(**kwargs)
    print(info.value)


def test_tied_embedding_either_or_both(loaded, tmp_path):
    """umT5's embedding loads from shared.weight, encoder.embed_tokens.weight or both, but two differing copies raise."""
    state = {T5_KEYS.to_reference(k): v for k, v in loaded.text_encoder.state_dict().items()}
    embedding = state.pop("shared.weight")
    variants = {"shared": {"shared.weight": embedding}, "embed_tokens": {"encoder.embed_tokens.weight": embedding},
                "both": {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding.clone()},
                "differing": {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding + 1}}
    for name, embeddings in variants.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(state | embeddings, path)
        if name == "differing":
            with pytest.raises(CheckpointError, match="weight differs from its tied twin"):
                load_part("text", path, TINY)
        else:
            assert state_dicts_equal(load_part("text", path, TINY), loaded.text_encoder.state_dict())


def test_save_diffusers_round_trip(reference, loaded, tmp_path):
    """save_diffusers -> load_wan is bit-identical (config too), and diffusers' WanPipeline loads the folder."""
    cfg = dataclasses.replace(loaded.cfg, fps=8, num_frames=17, sample_shift=3.0, guidance_scale=4.5)
    models = dataclasses.replace(loaded, cfg=cfg)
    folder = tmp_path / "saved"
    save_diffusers(str(folder), models)
    again = load_wan(str(folder))
    assert again.cfg == cfg and again.model_id == loaded.model_id
    for ours, original in ((again.dit, loaded.dit), (again.vae, loaded.vae),
                           (again.text_encoder, loaded.text_encoder)):
        assert state_dicts_equal(ours, original.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.tokenizer(PROMPTS), loaded.tokenizer(PROMPTS)))

    pipe = WanPipeline.from_pretrained(str(folder))
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.scheduler.config.prediction_type == "flow_prediction"
    assert_same_outputs(loaded, pipe.transformer, pipe.vae, pipe.text_encoder)
    cleaned = [clean_prompt(p) for p in PROMPTS]
    hf = pipe.tokenizer(cleaned, padding="max_length", max_length=cfg.t5.text_len, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    ids, mask = loaded.tokenizer(PROMPTS)
    assert torch.equal(hf.input_ids, ids) and torch.equal(hf.attention_mask, mask)


def test_save_diffusers_bf16_and_atomic(loaded, tmp_path, monkeypatch):
    """dtype=bf16 stores the rounded weights; a write that fails midway leaves no folder and no temp files."""
    save_diffusers(str(tmp_path / "bf16"), loaded, dtype=torch.bfloat16)
    again = load_wan(str(tmp_path / "bf16"), parts=("dit",))
    assert state_dicts_equal(again.dit, {k: v.to(torch.bfloat16).float() for k, v in loaded.dit.state_dict().items()})
    with pytest.raises(FileExistsError):
        save_diffusers(str(tmp_path / "bf16"), loaded)

    calls = []

    def fail_on_second_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)
    monkeypatch.setattr(save, "save_file", fail_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(str(tmp_path / "interrupted"), loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_toy_preset_round_trip(reference, tmp_path):
    """A toy-preset model (the project's pretrained checkpoint) saves and reloads as the toy preset, bit for bit."""
    cfg = PRESETS["toy"]
    torch.manual_seed(0)
    tokenizer = Tokenizer(str(reference.folder / "tokenizer"), cfg.t5.text_len)
    models = WanModels(cfg, "toy", WanDiT(cfg.dit), WanVAE(cfg.vae), UMT5Encoder(cfg.t5), tokenizer)
    save_diffusers(str(tmp_path / "toy"), models)
    again = load_wan(str(tmp_path / "toy"))
    assert again.cfg == cfg and again.model_id == "toy" and again.tokenizer.text_len == cfg.t5.text_len
    for ours, original in ((again.dit, models.dit), (again.vae, models.vae), (again.text_encoder, models.text_encoder)):
        assert state_dicts_equal(ours, original.state_dict())


@pytest.mark.parametrize("name, build, key_map", [
    ("DiT 14B", lambda: WanDiT(PRESETS["wan2.1-t2v-14b"].dit), DIT_KEYS),
    ("VAE", lambda: WanVAE(PRESETS["wan2.1-t2v-14b"].vae), vae_keys(2, 4)),
    ("umT5-XXL", lambda: UMT5Encoder(PRESETS["wan2.1-t2v-14b"].t5), T5_KEYS),
])
def test_key_maps_invert_on_full_size_models(name, build, key_map):
    """Every full-size key maps to a distinct reference key and back to itself (save uses one way, load the other)."""
    with torch.device("meta"):
        keys = list(build().state_dict())
    reference_keys = [key_map.to_reference(k) for k in keys]
    assert len(set(reference_keys)) == len(keys)
    assert [key_map.to_ours(k) for k in reference_keys] == keys


def test_load_part_matches_load_wan(reference, loaded):
    """load_part, the one-module entry point, loads the same weights as load_wan."""
    vae = load_part("vae", str(reference.folder / "vae" / "diffusion_pytorch_model.safetensors"), TINY)
    assert state_dicts_equal(vae, loaded.vae.state_dict())
