"""Latent analysis: streaming statistics against brute force, entropy, constant memory, unreadable images,
refusing a mismatched SAE, patch maps, group counts, and `patchsae analyze` end to end on a tiny run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchsae import PatchSAEError, cli
from patchsae.analysis import latents, patch_maps
from patchsae.runs.artefacts import open_run
from patchsae.stages.analyze import AnalyzeOptions
from patchsae.stages.analyze import run as stage_analyze
from patchsae.data.base import FirstN, iter_batches
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.models.load import load_model
from patchsae.runs import Run, RunConfig
from patchsae.sae.checkpoint import save_sae
from patchsae.sae.model import SAE, SAEConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_sae(d_model=32, d_sae=64, n_dead=5, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d_model, d_sae=d_sae))
    with torch.no_grad():
        sae.b_enc[:n_dead] = -1e4  # latents that never fire
    return sae


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


# ---- streaming statistics ------------------------------------------------------------------------------------

def test_streaming_stats_match_brute_force(tiny, monkeypatch):
    model, sae = tiny, _random_sae()
    ds = FirstN(FashionMNIST("test"), 40)
    monkeypatch.setattr(latents, "ENCODE_ELEMENTS", 3 * 50 * 64)  # also split each batch into chunks of 3
    k, tau = 4, 0.2
    stats = latents.collect_stats(model, sae, ds, -2, batch_size=7, k=k, tau=tau, progress=False)

    pixels, labels, idx = next(iter_batches(ds, model.preprocess, 40))
    rows_T, patch_rows_T = latents.image_rows(model)
    with torch.no_grad():
        f_NTS = sae.encode(model.block_output(pixels, -2)[:, rows_T])
    img_NS = f_NTS.mean(1)
    fired_S = (img_NS > 0).sum(0)
    assert stats.n_images == 40
    torch.testing.assert_close(stats.fired_S, fired_S)
    torch.testing.assert_close(stats.frequency_S, fired_S / 40)
    mean_S = torch.where(fired_S > 0, (img_NS * (img_NS > 0)).sum(0) / fired_S.clamp_min(1), 0.0)
    torch.testing.assert_close(stats.mean_act_S, mean_S, rtol=1e-5, atol=1e-6)
    assert (stats.frequency_S[:5] == 0).all() and (stats.mean_act_S[:5] == 0).all()
    assert 0 < int((stats.frequency_S > 0).sum()) < 64
    for t in stats.tensors().values():
        assert torch.isfinite(t.float()).all()

    patch_NS = f_NTS[:, patch_rows_T].amax(1)
    for value_NS, (val_SK, idx_SK, lab_SK) in ((img_NS, (stats.top_value_SK, stats.top_index_SK, stats.top_label_SK)),
                                               (patch_NS, (stats.patch_value_SK, stats.patch_index_SK,
                                                           stats.patch_label_SK))):
        for s in range(64):
            order = torch.argsort(value_NS[:, s], descending=True)
            want = [int(idx[i]) for i in order[:k] if value_NS[i, s] > 0]
            got = [int(i) for i in idx_SK[s] if i >= 0]
            assert set(got) == set(want), s
            assert [int(labels[(idx == i).nonzero()[0, 0]]) for i in got] == [int(y) for y in lab_SK[s][:len(got)]]
            torch.testing.assert_close(val_SK[s][:len(got)], value_NS[order[:len(got)], s], rtol=1e-5, atol=1e-6)
            assert (idx_SK[s][len(got):] == -1).all() and (val_SK[s][len(got):] == 0).all()

    counts_CS = torch.zeros(10, 64, dtype=torch.long).index_add_(0, labels, (f_NTS > tau).sum(1))
    assert counts_CS.sum() > 0
    torch.testing.assert_close(stats.class_counts_CS, counts_CS)
    torch.testing.assert_close(latents.dataset_counts(stats.class_counts_CS), counts_CS.sum(0))
    torch.testing.assert_close(stats.class_images_C, torch.bincount(labels, minlength=10))
    torch.testing.assert_close(stats.position_mass_ST, f_NTS.double().sum(0).T.float(), rtol=1e-5, atol=1e-5)
    assert stats.position_mass_ST.shape == (64, int(rows_T.sum()))
    torch.testing.assert_close(stats.token_fired_S, (f_NTS > 0).sum((0, 1)))
    torch.testing.assert_close(stats.token_frequency_S, ((f_NTS > 0).float().mean((0, 1))))


def test_entropy_hand_example():
    value_SK = torch.tensor([[2.0, 1.0, 1.0], [5.0, 4.0, 0.0], [0.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    label_SK = torch.tensor([[1, 0, 0], [7, 7, -1], [-1, -1, -1], [2, 4, -1]])
    ent_S, maj_S = latents.label_entropy(value_SK, label_SK, n_classes=10)
    expected = [np.log(2), 0.0, 0.0, -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))]
    np.testing.assert_allclose(ent_S.numpy(), expected, rtol=1e-6)
    assert maj_S[1] == 7 and maj_S[2] == -1 and maj_S[3] == 2 and maj_S[0] in (0, 1)
    assert not torch.signbit(ent_S).any()  # a single label is 0, not -0


def test_accumulator_memory_does_not_grow_with_images():
    torch.manual_seed(0)
    acc = latents.LatentAccumulator(d_sae=256, n_classes=10, n_tokens=17, k=10)
    patch_rows_T = torch.tensor([False] + [True] * 16)

    def batch(start):
        f_BTS = torch.relu(torch.randn(32, 17, 256))
        return f_BTS, torch.randint(0, 10, (32,)), torch.arange(start, start + 32)

    acc.update(*batch(0), patch_rows_T)
    size = acc.nbytes()
    shapes = [tuple(t.shape) for t in acc.tensors()]
    for b in range(1, 60):
        acc.update(*batch(32 * b), patch_rows_T)
    assert acc.nbytes() == size and [tuple(t.shape) for t in acc.tensors()] == shapes
    assert acc.n_images == 60 * 32
    # O(d_sae x (k + classes + positions)): two top-k tables (float32 value, int64 index and label), class
    # counts, position mass (float64), fired images, activation sums and fired tokens; images per class
    assert size == 256 * (2 * 10 * (4 + 8 + 8) + 10 * 8 + 17 * 8 + 8 + 8 + 8) + 10 * 8


def test_group_counts_sum_chosen_rows():
    counts_CS = torch.arange(30).view(5, 6)
    torch.testing.assert_close(latents.group_counts(counts_CS, [1, 3]), counts_CS[1] + counts_CS[3])
    assert latents.resolve_classes(["b", "2"], ["a", "b", "c"]) == [1, 2]
    with pytest.raises(PatchSAEError, match="unknown class 'z'"):
        latents.resolve_classes(["z"], ["a", "b", "c"])


# ---- run directories -----------------------------------------------------------------------------------------

def _folder_run(tmp_path, tiny_clip_dir, sae) -> Run:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    run = Run(tmp_path / "run")
    run.init(RunConfig(model=str(tiny_clip_dir), dataset=str(root)), {})
    save_sae(run.sae_dir, sae)
    return run


def test_undecodable_image_is_skipped_and_counted(tmp_path, tiny_clip_dir):
    run = _folder_run(tmp_path, tiny_clip_dir, _random_sae())
    report = stage_analyze(run, AnalyzeOptions(k=3, n_grid=2, batch_size=4), progress=False)
    manifest = json.loads((run.path / "analysis" / "manifest.json").read_text())
    assert manifest["n_images"] == 6 and manifest["n_skipped"] == 1
    assert manifest["skipped"][0][0] == 6  # cat/0-2, dog/0-2, then dog/broken.png
    assert report.manifest["n_skipped"] == 1 and manifest["class_names"] == ["cat", "dog"]


def test_mean_embedding_names_agree_with_the_hooked_path(tmp_path, tiny_clip_dir):
    """The naming embedding (a full forward per reference) equals the one the steering pass computes from the
    hooked block (block_output + finish_from), and steering by alpha = 0 changes nothing."""
    from patchsae.analysis import concepts
    from patchsae.data import open_dataset

    run = _folder_run(tmp_path, tiny_clip_dir, _random_sae())
    cfg, model, sae, _ = open_run(run)
    ds = open_dataset(cfg.dataset, cfg.eval_split)
    stats = latents.collect_stats(model, sae, ds, cfg.layer, batch_size=4, k=3, progress=False)
    mean_SE = concepts.mean_reference_embeddings(model, ds, stats)
    steer_SE, hooked_mean_SE = concepts.concept_directions(model, sae, ds, cfg.layer, stats, latents_per_chunk=16)
    torch.testing.assert_close(mean_SE, hooked_mean_SE, rtol=1e-4, atol=1e-5)
    assert (steer_SE.abs().sum(1) > 0).sum() > 0
    dead = stats.fired_S == 0
    assert dead.any() and (mean_SE[dead] == 0).all() and (steer_SE[dead] == 0).all()
    zero = latents.LatentStats(**{**stats.__dict__, "patch_value_SK": torch.zeros_like(stats.patch_value_SK)})
    torch.testing.assert_close(concepts.concept_directions(model, sae, ds, cfg.layer, zero)[0],
                               torch.zeros_like(steer_SE), atol=1e-6, rtol=0)
    index_SN, score_SN = concepts.name_latents(mean_SE, torch.eye(mean_SE.shape[1])[:4])
    assert (index_SN[dead] == -1).all() and (score_SN[dead] == 0).all()


def test_sae_of_another_width_is_refused(tmp_path, tiny_clip_dir, capsys):
    run = _folder_run(tmp_path, tiny_clip_dir, _random_sae(d_model=48))
    with pytest.raises(PatchSAEError, match="width 48"):
        open_run(run)
    assert cli.main(["analyze", "--run", str(run.path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("patchsae: error:") and "width" in err[0]
    assert not (run.path / "analysis").exists()


def test_sae_of_another_layer_is_refused(tmp_path, tiny_clip_dir):
    run = _folder_run(tmp_path, tiny_clip_dir, _random_sae())
    save_sae(run.sae_dir, _random_sae(), {"layer": 0})  # the run's config hooks block -2 = 1 of 3
    with pytest.raises(PatchSAEError, match="trained on block 0.*hooks block 1"):
        open_run(run)


# ---- patch maps ----------------------------------------------------------------------------------------------

def test_patch_map_shapes_and_upsampling(tiny):
    layout = tiny.layout()
    assert layout.grid == (7, 7)
    f_TS = torch.relu(torch.randn(1 + 49, 20))
    grid = patch_maps.patch_grid(f_TS, layout, 3)
    assert grid.shape == (7, 7)
    torch.testing.assert_close(grid.flatten(), f_TS[1:, 3])
    assert patch_maps.upsample(grid, (28, 28)).shape == (28, 28)
    torch.testing.assert_close(patch_maps.upsample(torch.full((7, 7), 2.5), (28, 28)), torch.full((28, 28), 2.5))
    one_hot = torch.zeros(7, 7)
    one_hot[2, 5] = 1.0
    up = patch_maps.upsample(one_hot, (28, 28))
    assert divmod(int(up.argmax()), 28)[0] // 4 == 2 and divmod(int(up.argmax()), 28)[1] // 4 == 5

    pixels = torch.randn(3, 28, 28)
    img = patch_maps.display_image(pixels, tiny)
    assert img.shape == (28, 28, 3) and img.min() >= 0 and img.max() <= 1
    heat = patch_maps.heatmap_overlay(img, up)
    seg = patch_maps.segmentation(img, up)
    assert heat.shape == seg.shape == (28, 28, 3) and 0 <= heat.min() and heat.max() <= 1
    assert (seg[up.numpy() == 0] == 0).all()
    torch.testing.assert_close(torch.from_numpy(seg[up.numpy() == 1]), torch.from_numpy(img[up.numpy() == 1]))

    f_TS[1 + 2 * 7 + 5, 11] = 100.0
    ids, vals = patch_maps.top_latents_of_patch(f_TS, layout, 2, 5, n=3)
    assert ids[0] == 11 and vals[0] == 100.0 and len(ids) == 3
    ids, _ = patch_maps.top_latents_of_image(f_TS, n=2)
    assert ids[0] == 11
    with pytest.raises(PatchSAEError, match="outside the 7x7 grid"):
        patch_maps.top_latents_of_patch(f_TS, layout, 7, 0)


# ---- the command line ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(make_tiny_run):
    return make_tiny_run("analyze")


def test_cli_analyze_end_to_end(quick_run, tmp_path, capsys):
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# extra names\nstripes\n\nsleeve\n")
    capsys.readouterr()
    assert cli.main(["analyze", "--run", str(quick_run), "--max-images", "50", "--batch-size", "16",
                     "--group", "t-shirt", "shirt", "--phrases", str(phrases), "--steer"]) == 0
    out = capsys.readouterr().out
    assert "name agreement" in out and "entropy < 0.5" in out

    from safetensors.torch import load_file

    a = quick_run / "analysis"
    manifest = json.loads((a / "manifest.json").read_text())
    for key in ("dataset", "split", "n_images", "n_skipped", "sae", "model", "layer", "tau", "k"):
        assert key in manifest, key
    assert manifest["n_images"] == 50 and manifest["split"] == "test" and manifest["layer"] == 1
    assert manifest["naming"]["vocabulary"][-2:] == ["stripes", "sleeve"]
    stats = load_file(str(a / "stats.safetensors"))
    d_sae = 4 * 32
    assert stats["frequency_S"].shape == (d_sae,) and stats["top_index_SK"].shape == (d_sae, 10)
    assert stats["class_counts_CS"].shape == (10, d_sae) and stats["name_index_SN"].shape == (d_sae, 3)
    torch.testing.assert_close(stats["group_counts_S"], stats["class_counts_CS"][[0, 6]].sum(0))
    for t in stats.values():
        assert torch.isfinite(t.float()).all()
    rows = list(csv.DictReader((a / "latents.csv").open()))
    assert len(rows) == d_sae and rows[0]["latent"] == "0" and "name1" in rows[0]
    for png in ("latent_scatter.png", "reference_images.png", "class_top_latents.png", "latent_kinds.png"):
        assert (quick_run / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not [p for p in quick_run.rglob("*.tmp")]
    # kinds: one per latent in the CSV, the stats file and the manifest's counts, printed by kind
    kind_names = manifest["kinds"]["names"]
    assert [r["kind"] for r in rows] == [kind_names[int(k)] for k in stats["kind_S"]]
    assert manifest["kinds"]["counts"] == {k: sum(r["kind"] == k for r in rows) for k in kind_names}
    assert all(r["kind"] != "dead" or int(r["fired_images"]) == 0 for r in rows)
    assert "latents per kind: class-selective" in out and manifest["kinds"]["thresholds"]["dense_frequency"] == 0.5
    before = (a / "manifest.json").read_bytes()
    assert cli.main(["analyze", "--run", str(quick_run), "--dense-frequency", "0"]) == 2
    assert "dense-frequency must be in (0, 1]" in capsys.readouterr().err
    assert (a / "manifest.json").read_bytes() == before  # a bad threshold loses nothing already written

    # patch-map mode, by dataset index and by image file
    assert cli.main(["analyze", "--run", str(quick_run), "--image", "3", "--patch", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "top latents of patch (2, 4)" in out
    assert list((quick_run / "figures").glob("patch_map_3_*.png"))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photo)
    assert cli.main(["analyze", "--run", str(quick_run), "--image", str(photo), "--latent", "5"]) == 0
    assert (quick_run / "figures" / "patch_map_photo_5.png").is_file()
    assert cli.main(["analyze", "--run", str(quick_run), "--image", str(tmp_path / "missing.png")]) == 2
