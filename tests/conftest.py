"""Shared fixtures: small random CLIPs in Hugging Face format, so tests do not depend on trained weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(2)


def make_clip(folder: Path, *, width=32, layers=3, heads=2, image_size=28, patch=4, text_width=32,
              text_layers=2, proj=16, act="quick_gelu", seed=0):
    """Write a random HF CLIP (weights, byte tokenizer, preprocessor config) to `folder`."""
    from transformers import CLIPConfig, CLIPModel

    from patchsae.models.tokenizer import build_byte_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=258, hidden_size=text_width, intermediate_size=4 * text_width,
                         num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=77,
                         bos_token_id=256, eos_token_id=257, pad_token_id=257, hidden_act=act),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch, hidden_act=act),
        projection_dim=proj,
    )
    model = CLIPModel(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size},
         "image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run many times faster on one thread than on two when the machine is busy; modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def make_tiny_run(tiny_clip_dir, tmp_path_factory):
    """Build a small quickstart run on the tiny model in a fresh directory (each caller gets its own, since
    later stages write into it)."""
    from patchsae import cli

    def make(name: str) -> Path:
        run = tmp_path_factory.mktemp(name) / "run"
        assert cli.main(["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), "--max-train-images",
                         "200", "--max-eval-images", "60", "--expansion", "4", "--warmup-steps", "5"]) == 0
        return run

    return make
