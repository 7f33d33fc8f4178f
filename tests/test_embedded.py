"""The embedded default model: a real, trained CLIP whose zero-shot accuracy the README states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from patchsae.data import iter_batches, open_dataset
from patchsae.models.load import EMBEDDED_DIR, load_model

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model():
    return load_model("embedded")


def test_embedded_files_small_and_complete():
    files = {p.name for p in EMBEDDED_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir())
    assert total < 20 * 2**20


def test_zero_shot_accuracy_on_all_test_images(model):
    ds = open_dataset("fashion-mnist", "test")
    head_CE = model.text_head(ds.class_names)
    correct = n = 0
    for pixels, labels, _ in iter_batches(ds, model.preprocess, 1000):
        pred = model.logits(model.image_features(pixels), head_CE).argmax(-1)
        correct += (pred == labels).sum().item()
        n += len(labels)
    assert n == 10_000
    acc = correct / n
    assert acc >= 0.85
    # the quickstart table's "original" row is the embedded model's accuracy on all 10,000 test images
    stated = re.search(r"^\| zero-shot accuracy, original \| ([0-9.]+) % \|", README.read_text(), re.M)
    assert stated, "README must state the embedded model's zero-shot accuracy"
    assert abs(float(stated.group(1)) - 100 * acc) < 0.05


def test_unseen_class_names_get_distinct_embeddings(model):
    names = ["digit 3", "digit 8", "cat", "airplane", "t-shirt", "shirt"]
    emb = torch.nn.functional.normalize(model.text_features([f"a photo of a {n}." for n in names]), dim=-1)
    sim = emb @ emb.T
    off_diag = sim[~torch.eye(len(names), dtype=bool)]
    assert off_diag.max() < 0.9999
