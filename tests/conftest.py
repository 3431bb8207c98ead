"""Shared pytest setup: `slow` tests run only with --runslow; the tiny random Wan the end-to-end tests train."""
import os

import pytest
import sentencepiece as spm
import torch

from video import write_video
from model.config import PRESETS
from model.dit import WanDiT
from model.loader import WanModels
from model.save import save_diffusers
from model.text_encoder import Tokenizer, UMT5Encoder
from model.vae import WanVAE


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


WORDS = "a an the red blue green square circle moving left right on background sks zwx motion dog man park".split()


def moving_square(num_frames: int, size: int = 32) -> torch.Tensor:
    """(T, 3, H, W) in [-1, 1]: a red square sliding right over blue."""
    video = torch.zeros(num_frames, 3, size, size)
    video[:, 2] = 0.6
    for t in range(num_frames):
        x = 2 + t
        video[t, :, 10:20, x:x + 10] = torch.tensor([0.9, -0.8, -0.8])[:, None, None]
    return video


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Wan in the diffusers layout, a 12-frame clip, and the flags every run shares."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6)) for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, user_defined_symbols=["sks", "zwx"],
                                   minloglevel=2)
    (root / "tok").mkdir()
    os.replace(root / "spiece.model", root / "tok" / "spiece.model")
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    dit = WanDiT(cfg.dit)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)   # a zero head would make the base model trivial
    models = WanModels(cfg, "tiny", dit, WanVAE(cfg.vae), UMT5Encoder(cfg.t5), Tokenizer(str(root / "tok"), 16))
    save_diffusers(str(root / "model"), models)
    video = str(root / "clip.mp4")
    write_video(video, moving_square(12), fps=cfg.fps, lossless=True)
    model = ["--model", str(root / "model"), "--batch", "2", "--grad-accum", "1", "--prior-count", "2", "--prior-batch", "1"]
    concept = ["--video", video, "--prompt", "a sks square on blue", "--motion-prompt",
               "a sks square moving in zwx motion", "--id-token", "sks", "--motion-token", "zwx"]
    return {"root": root, "video": video, "model": model, "flags": model + concept}


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a busy machine, threads waiting for each other crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
