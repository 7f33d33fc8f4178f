"""The paper's datasets by name, local copies through --dataset-path, and the paper preset's dry-run budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from patchsae import PatchSAEError
from patchsae.cli import main
from patchsae.data import open_dataset
from patchsae.data.registry import REGISTRY, base_novel_split, load_class_names, lookup

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED = {"imagenet-1k": 1000, "imagenet-sketch": 1000, "flowers102": 102, "caltech101": 102, "eurosat": 10,
            "dtd": 47, "oxford-pets": 37, "food101": 101, "stanford-cars": 196, "fgvc-aircraft": 100,
            "sun397": 397, "ucf101": 101}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_class_name_files(name):
    info = REGISTRY[name]
    names = info.class_names
    assert len(names) == EXPECTED[name] == info.n_classes
    assert all(n.strip() == n and n for n in names)
    assert len(set(names)) == len(names), "duplicate class names"
    assert set(info.splits) >= set(info.sizes)


def test_known_class_names_and_aliases():
    assert load_class_names("imagenet-1k")[0] == "tench"
    assert load_class_names("dtd")[0] == "banded" and load_class_names("food101")[0] == "apple pie"
    assert lookup("ImageNet") is REGISTRY["imagenet-1k"] and lookup("fashion-mnist") is None


@pytest.mark.parametrize("n,base", [(10, 5), (47, 24), (101, 51), (1000, 500), (1, 1)])
def test_base_novel_split_halves(n, base):
    b, nv = base_novel_split(n)
    assert b == list(range(base)) and nv == list(range(base, n))


@pytest.mark.parametrize("name", ["eurosat", "imagenet-1k", "ucf101"])
def test_unreachable_hub_says_dataset_path(name):
    with pytest.raises(PatchSAEError) as info:
        open_dataset(name, "train")
    msg = str(info.value)
    assert "\n" not in msg and "--dataset-path" in msg and name in msg


def test_cli_one_line_for_offline_registry(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "none")]) == 2  # sanity: errors are exit 2
    from patchsae.data.registry import open_registered

    with pytest.raises(PatchSAEError, match="--dataset-path"):
        open_registered(REGISTRY["dtd"], "test")


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)


def test_save_to_disk_copy_through_registry(tmp_path):
    import datasets

    raw = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=raw)})
    imgs = [Image.fromarray(np.full((5, 5, 3), k * 20, np.uint8)) for k in range(4)]
    split = datasets.Dataset.from_dict({"image": imgs, "label": [0, 3, 9, 3]}, features=feats)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "euro"))
    ds = open_dataset("eurosat", "test", path=str(tmp_path / "euro"))
    assert tuple(ds.class_names) == REGISTRY["eurosat"].class_names
    assert [ds.load(i)[1] for i in range(4)] == [0, 3, 9, 3]
    assert np.asarray(ds.load(2)[0]).max() == 40
    with pytest.raises(PatchSAEError, match="validation"):
        open_dataset("eurosat", "validation", path=str(tmp_path / "euro"))


def test_image_folder_copy_through_registry(tmp_path, capsys):
    names = REGISTRY["dtd"].class_names
    for k, cls in enumerate(names):  # DTD's folders are its class names, sorted
        _png(tmp_path / "dtd" / "test" / cls / f"{k}.png", k)
    ds = open_dataset("dtd", "test", path=str(tmp_path / "dtd"))
    assert len(ds) == 47 and tuple(ds.class_names) == names
    assert ds.load(5)[1] == 5
    # a copy with the wrong number of classes keeps its own names and says so
    _png(tmp_path / "few" / "a" / "0.png", 0)
    ds = open_dataset("dtd", "test", path=str(tmp_path / "few"))
    assert tuple(ds.class_names) == ("a",) and "keeping the data's own class names" in capsys.readouterr().err
    with pytest.raises(PatchSAEError, match="--dataset-path"):
        open_dataset("dtd", "test", path=str(tmp_path / "missing"))


def test_datasets_command(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name, info in REGISTRY.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert line.split()[-1] == str(info.n_classes)
    assert "timm/eurosat-rgb" in out and "--dataset-path" in out


def test_paper_dry_run_budget(tmp_path, capsys):
    run = tmp_path / "paper"
    assert main(["train", "--preset", "paper", "--dry-run", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert not run.exists(), "a dry run writes nothing"
    images, tokens, d, d_sae = 1_281_167, 197, 768, 64 * 768
    params = 2 * d * d_sae + d_sae + d
    batch = 128 * 197
    for number in (images, images * tokens, images * tokens * d * 2, params, 3 * params * 4, batch,
                   math.ceil(2 * images * tokens / batch)):
        assert f"{number:,}" in out, number
    for setting in ('"model": "openai/clip-vit-base-patch16"', '"layer": -2', '"arch": "relu"', '"expansion": 64',
                    '"l1_coeff": 8e-05', '"lr": 0.0004', '"warmup_steps": 500', '"batch_tokens": 25216',
                    '"dataset": "imagenet-1k"', '"tokens": "all"', '"objective": "reference"'):
        assert setting in out
    assert "objective            relu, reference: raw activations" in out


def test_objective_options_reach_the_sae_config(tmp_path, capsys):
    argv = ["train", "--preset", "paper", "--dry-run", "--run", str(tmp_path / "r"), "--objective", "scaled"]
    assert main(argv) == 0
    assert "relu, scaled: activations scaled" in capsys.readouterr().out
    argv[-1] = "paper-like"
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        main(argv)


def test_dry_run_respects_overrides(tmp_path, capsys):
    argv = ["quickstart", "--preset", "paper", "--dry-run", "--run", str(tmp_path / "r"), "--max-train-images",
            "1000", "--epochs", "1", "--dataset", "eurosat", "--dataset-path", str(tmp_path / "nowhere")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{1000 * 197:,}" in out and f"{math.ceil(1000 * 197 / 25216):,}" in out
    assert not (tmp_path / "r").exists()
    assert main(["train", "--dry-run", "--run", str(tmp_path / "e")]) == 2  # embedded: shape not in the table
