"""Datasets: image folders, Hugging Face datasets, Fashion-MNIST, and batching that skips unreadable images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from patchsae import PatchSAEError
from patchsae.data import SkipLog, iter_batches, open_dataset
from patchsae.data.folder import ImageFolder
from patchsae.models.clip import Preprocess

PRE = Preprocess(8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


pytestmark = pytest.mark.usefixtures("one_thread")


def _img(seed: int, size=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)


def _make_folder(root, layout: dict[str, int], seed0=0):
    """root/CLASS/img_K.png; returns {(class, k): pixels}."""
    pixels = {}
    s = seed0
    for cls, n in layout.items():
        for k in range(n):
            arr = _img(s)
            s += 1
            _write_png(root / cls / f"img_{k}.png", arr)
            pixels[(cls, k)] = arr
    return pixels


# ---- image folders ---------------------------------------------------------------------------------------------
def test_image_folder_classes_labels_and_pixels(tmp_path):
    root = tmp_path / "imgs"
    pixels = _make_folder(root, {"zebra": 2, "apple": 3, "mango": 1})
    (root / "apple" / "notes.txt").write_text("not an image")
    ds = open_dataset(str(root), "train")
    assert isinstance(ds, ImageFolder)
    assert tuple(ds.class_names) == ("apple", "mango", "zebra")
    assert len(ds) == 6
    seen = []
    for i in range(len(ds)):
        im, label = ds.load(i)
        cls = ds.class_names[label]
        match = [k for (c, k), arr in pixels.items() if c == cls and np.array_equal(np.asarray(im.convert("RGB")), arr)]
        assert len(match) == 1, f"image {i} does not match any image of its class {cls}"
        seen.append((cls, match[0]))
    assert sorted(seen) == sorted(pixels)


def test_image_folder_split_subfolders(tmp_path):
    root = tmp_path / "ds"
    _make_folder(root / "train", {"a": 2, "b": 2})
    _make_folder(root / "test", {"a": 1, "b": 1, "c": 1}, seed0=100)
    train = open_dataset(str(root), "train")
    test = open_dataset(str(root), "test")
    assert len(train) == 4 and tuple(train.class_names) == ("a", "b")
    assert len(test) == 3 and tuple(test.class_names) == ("a", "b", "c")
    assert train.split == "train" and test.split == "test"
    assert [test.load(i)[1] for i in range(3)] == [0, 1, 2]


def test_image_folder_nested_images(tmp_path):
    root = tmp_path / "nest"
    _write_png(root / "cls" / "sub" / "deep.png", _img(1))
    ds = open_dataset(str(root), "all")
    assert len(ds) == 1 and ds.load(0)[1] == 0


def test_corrupt_and_truncated_images_are_skipped(tmp_path):
    root = tmp_path / "bad"
    _make_folder(root, {"a": 3, "b": 3})
    # a: img_0 img_1 img_2 img_3(bad jpg) ; b: img_0 img_1 img_2 img_9(truncated png)
    (root / "a" / "img_3.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(_img(99, (32, 32)), "RGB").save(buf, format="PNG")
    whole = buf.getvalue()
    (root / "b" / "img_9.png").write_bytes(whole[: len(whole) // 2])
    ds = open_dataset(str(root), "train")
    assert len(ds) == 8
    bad = {i for i, (f, _) in enumerate(ds.files) if f.name in ("img_3.jpg", "img_9.png")}
    assert len(bad) == 2
    good = [i for i in range(len(ds)) if i not in bad]

    skips = SkipLog()
    got_idx, got_lbl, got_px = [], [], []
    for px, lbl, idx in iter_batches(ds, PRE, 3, skips=skips):
        assert px.shape[1:] == (3, 8, 8) and len(px) == len(lbl) == len(idx) <= 3
        got_idx += idx.tolist()
        got_lbl += lbl.tolist()
        got_px.append(px)
    assert got_idx == good
    assert got_lbl == [ds.files[i][1] for i in good]
    assert skips.count == 2 and sorted(i for i, _ in skips.skipped) == sorted(bad)
    expected = torch.stack([PRE.image(Image.open(ds.files[i][0])) for i in good])
    assert torch.allclose(torch.cat(got_px), expected)


def test_iter_batches_respects_indices_and_batch_size(tmp_path):
    root = tmp_path / "f"
    _make_folder(root, {"a": 4, "b": 3})
    ds = open_dataset(str(root), "x")
    order = [6, 0, 3, 2, 5]
    batches = list(iter_batches(ds, PRE, 2, indices=order))
    assert [len(b[2]) for b in batches] == [2, 2, 1]
    assert torch.cat([b[2] for b in batches]).tolist() == order
    assert torch.cat([b[1] for b in batches]).tolist() == [ds.files[i][1] for i in order]


class _Fatal:
    """A dataset whose image 4 raises the package's own error (it must end the run, with its message)."""

    def __init__(self, ds):
        self.ds, self.name, self.split, self.class_names = ds, ds.name, ds.split, ds.class_names

    def __len__(self):
        return len(self.ds)

    def load(self, i):
        if i == 4:
            raise PatchSAEError("image 4: the archive is not what the registry says")
        return self.ds.load(i)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_worker_processes_give_the_same_batches(tmp_path, batch_size):
    """Decoding in DataLoader workers yields the serial loop's batches exactly (unreadable images skipped and
    recorded, batches re-cut around them, the order kept), and a PatchSAEError keeps its one-line message."""
    root = tmp_path / "w"
    _make_folder(root, {"a": 5, "b": 6})
    (root / "a" / "img_7.jpg").write_bytes(b"not a jpeg")
    (root / "b" / "img_8.png").write_bytes(b"nor a png")
    ds = open_dataset(str(root), "train")
    order = [10, 0, 3, 12, 1, 2, 11, 4, 5, 6, 7, 8, 9]
    serial_skips, worker_skips = SkipLog(), SkipLog()
    serial = list(iter_batches(ds, PRE, batch_size, order, serial_skips))
    workers = list(iter_batches(ds, PRE, batch_size, order, worker_skips, workers=2, pin_memory=True))
    assert serial_skips.count == 2 and worker_skips.skipped == serial_skips.skipped
    assert [len(b[2]) for b in workers] == [len(b[2]) for b in serial]
    for (px, lbl, idx), (px2, lbl2, idx2) in zip(serial, workers):
        assert torch.equal(px, px2) and torch.equal(lbl, lbl2) and torch.equal(idx, idx2)
    with pytest.raises(PatchSAEError, match="^image 4: the archive is not what the registry says$"):
        list(iter_batches(_Fatal(ds), PRE, batch_size, workers=2))


def test_empty_image_folder_fails_clearly(tmp_path):
    root = tmp_path / "empty"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("x")
    ds = open_dataset(str(root), "train")
    with pytest.raises(PatchSAEError, match="no images"):
        next(iter_batches(ds, PRE, 4))


def test_folder_without_class_dirs_and_missing_spec(tmp_path):
    with pytest.raises(PatchSAEError):
        ImageFolder(tmp_path)
    with pytest.raises(PatchSAEError):
        open_dataset(str(tmp_path / "does-not-exist"), "train")


def test_all_images_unreadable_yields_nothing_and_counts(tmp_path):
    root = tmp_path / "allbad"
    (root / "a").mkdir(parents=True)
    for k in range(3):
        (root / "a" / f"{k}.png").write_bytes(b"not a png at all")
    skips = SkipLog()
    assert list(iter_batches(open_dataset(str(root), "t"), PRE, 2, skips=skips)) == []
    assert skips.count == 3


# ---- Hugging Face datasets -------------------------------------------------------------------------------------
NAMES = ["cat", "dog", "bird"]


def _hf_dataset(n, seed0=0, labels=None):
    import datasets

    imgs = [Image.fromarray(_img(seed0 + k, (6 + k % 3, 5)), "RGB") for k in range(n)]
    labels = labels if labels is not None else [k % 3 for k in range(n)]
    feats = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"picture": imgs, "kind": labels}, features=feats), imgs, labels


def test_hf_save_to_disk_dataset(tmp_path):
    ds_hf, imgs, labels = _hf_dataset(5)
    ds_hf.save_to_disk(str(tmp_path / "hf"))
    ds = open_dataset(str(tmp_path / "hf"), "train")
    assert len(ds) == 5
    assert tuple(ds.class_names) == tuple(NAMES)
    for i in range(5):
        im, label = ds.load(i)
        assert label == labels[i]
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(imgs[i]))
    batches = list(iter_batches(ds, PRE, 2))
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(5))
    assert torch.cat([b[1] for b in batches]).tolist() == labels


def test_hf_dataset_dict_splits(tmp_path):
    import datasets

    train, _, train_labels = _hf_dataset(4)
    test, test_imgs, test_labels = _hf_dataset(3, seed0=50, labels=[2, 2, 1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    ds_train = open_dataset(str(tmp_path / "dd"), "train")
    ds_test = open_dataset(str(tmp_path / "dd"), "test")
    assert len(ds_train) == 4 and len(ds_test) == 3
    assert tuple(ds_test.class_names) == tuple(NAMES)
    assert [ds_test.load(i)[1] for i in range(3)] == test_labels
    assert [ds_train.load(i)[1] for i in range(4)] == train_labels
    assert np.array_equal(np.asarray(ds_test.load(1)[0].convert("RGB")), np.asarray(test_imgs[1]))
    with pytest.raises(PatchSAEError, match="validation"):
        open_dataset(str(tmp_path / "dd"), "validation")


def test_hf_corrupt_row_is_skipped_alone(tmp_path):
    import datasets

    good = [Image.fromarray(_img(k), "RGB") for k in range(3)]
    rows = [good[0], {"bytes": b"garbage bytes, not an image", "path": None}, good[1], good[2]]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    datasets.Dataset.from_dict({"image": rows, "label": [0, 1, 0, 1]}, features=feats).save_to_disk(
        str(tmp_path / "c"))
    ds = open_dataset(str(tmp_path / "c"), "train")
    skips = SkipLog()
    batches = list(iter_batches(ds, PRE, 8, skips=skips))
    assert torch.cat([b[2] for b in batches]).tolist() == [0, 2, 3]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1]
    assert skips.count == 1 and skips.skipped[0][0] == 1


def test_hf_hub_name_offline_fails_with_one_line():
    with pytest.raises(PatchSAEError) as info:
        open_dataset("hf:some-user/surely-not-a-dataset-xyz", "train")
    assert "\n" not in str(info.value)
    assert "surely-not-a-dataset-xyz" in str(info.value)


def test_unknown_dataset_spec():
    with pytest.raises(PatchSAEError):
        open_dataset("no-such-dataset-anywhere", "train")


# ---- Fashion-MNIST ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist(split, n):
    ds = open_dataset("fashion-mnist", split)
    assert len(ds) == n
    assert len(ds.class_names) == 10 and len(set(ds.class_names)) == 10
    labels = np.asarray(ds.labels)
    assert labels.min() == 0 and labels.max() == 9
    # Fashion-MNIST is balanced: 6,000 (train) or 1,000 (test) images per class
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    for i in (0, n - 1):
        im, label = ds.load(i)
        assert im.mode == "L" and im.size == (28, 28)
        assert label == int(labels[i])
        assert np.array_equal(np.asarray(im), ds.images[i])
    # real images, not blank: some pixels dark, some bright
    arr = ds.images[:100]
    assert arr.min() == 0 and arr.max() > 200


def test_fashion_mnist_bad_split():
    with pytest.raises(PatchSAEError):
        open_dataset("fashion-mnist", "validation")
