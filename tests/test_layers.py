"""Several layers per run: one forward pass fills one cache per block, each bitwise equal to a one-block cache of
that block; train, evaluate and analyze per block, `--layer` choosing; single-layer runs keep their layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from patchsae import PatchSAEError, cli
from patchsae.activations.cache import build_cache, build_caches
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.models.load import load_model
from patchsae.runs import Run, RunConfig
from patchsae.runs.config import resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")
N_IMAGES, SHARD, BATCH = 90, 64, 32


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".npy"}


def test_per_layer_caches_equal_single_layer_caches_bitwise(tiny, tmp_path):
    ds = FashionMNIST("test")
    layers = [-1, 0, -2]
    multi = [tmp_path / f"multi{i}" for i in range(3)]
    ms = build_caches(tiny, ds, layers, multi, batch_size=BATCH, shard_images=SHARD, max_images=N_IMAGES,
                      progress=False)
    for layer, folder, m in zip(layers, multi, ms):
        single = tmp_path / f"single{layer}"
        ref = build_cache(tiny, ds, layer, single, batch_size=BATCH, shard_images=SHARD, max_images=N_IMAGES,
                          progress=False)
        assert m == ref and m["layer"] == layer % tiny.n_layers
        got, want = _shard_bytes(folder), _shard_bytes(single)
        assert len(want) == 4 and got == want  # two shards, each with its index file
    assert json.loads((multi[0] / "manifest.json").read_text()) == ms[0]


def test_several_blocks_cost_one_forward_pass(tiny, tmp_path):
    """Block 0 runs once per batch whether one or three blocks are extracted."""
    calls = []
    handle = tiny.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        build_caches(tiny, FashionMNIST("test"), [0, 1, 2], [tmp_path / str(i) for i in range(3)], batch_size=BATCH,
                     shard_images=SHARD, max_images=N_IMAGES, progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # batches of 32, 32 (shard 0) and 26 (shard 1)


def test_layers_option_normalised_and_resolved():
    cfg = RunConfig(layers=["-2", "0", "10"])
    assert cfg.layers == ("-2", "0", "10")
    assert resolve_layers(cfg, 12) == [10, 0]  # -2 and 10 are one block
    assert resolve_layers(RunConfig(layers=("all",)), 3) == [0, 1, 2]
    assert resolve_layers(RunConfig(layer=-1), 3) == [2]
    assert "layers" not in RunConfig().to_json()  # single-layer runs keep today's config.json
    with pytest.raises(PatchSAEError, match="--layers takes block indices"):
        RunConfig(layers=("-2", "x"))
    with pytest.raises(PatchSAEError, match="layer 5 does not exist"):
        resolve_layers(RunConfig(layers=("5",)), 3)


@pytest.fixture(scope="module")
def multi_run(tiny_clip_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("multi") / "run"
    common = ["--run", str(run)]
    assert cli.main(["cache", *common, "--model", str(tiny_clip_dir), "--layers", "-1", "0", "--max-train-images",
                     "120", "--max-eval-images", "40", "--expansion", "2", "--warmup-steps", "5",
                     "--batch-tokens", "512", "--arch", "topk", "--k", "4"]) == 0
    assert cli.main(["train", *common]) == 0
    return run


def test_multi_layer_run_layout_and_train(multi_run):
    run = Run(multi_run)
    assert json.loads(run.layers_file.read_text()) == {"n_blocks": 3, "layers": [2, 0]}
    for layer in (2, 0):
        m = json.loads((multi_run / "cache" / "train" / f"layer{layer}" / "manifest.json").read_text())
        assert m["layer"] == layer and m["n_images"] == 120
        sae_cfg = json.loads((multi_run / "sae" / f"layer{layer}" / "config.json").read_text())
        assert sae_cfg["sae"]["d_sae"] == 2 * 32 and sae_cfg["layer"] == layer
    assert not (multi_run / "sae" / "model.safetensors").exists()
    # both SAEs trained on their own block: same recipe, different weights
    a = (multi_run / "sae" / "layer2" / "model.safetensors").read_bytes()
    assert a != (multi_run / "sae" / "layer0" / "model.safetensors").read_bytes()


def test_evaluate_table_over_layers_and_one_layer(multi_run, capsys):
    assert cli.main(["evaluate", "--run", str(multi_run)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2 ") or line.startswith("| 0 ")]
    assert [r.split("|")[1].strip() for r in rows] == ["2", "0"]
    per_layer = {L: json.loads((multi_run / "eval" / f"layer{L}" / "metrics.json").read_text()) for L in (2, 0)}
    for row, L in zip(rows, (2, 0)):  # the table shows each block's own metrics file
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[1]) == pytest.approx(per_layer[L]["explained_variance"], abs=5e-4)
        assert float(cells[5]) == pytest.approx(per_layer[L]["spliced_accuracy"], abs=5e-4)
    assert (multi_run / "eval" / "layers.md").read_text().strip() in out
    assert cli.main(["evaluate", "--run", str(multi_run), "--layer", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == per_layer[0]


def test_layer_choice_errors(multi_run, make_tiny_run, capsys):
    assert cli.main(["evaluate", "--run", str(multi_run), "--layer", "1"]) == 2
    assert "block 1 is not one of this run's blocks [2, 0]" in capsys.readouterr().err
    assert Run(multi_run).at(-1).sae_dir == multi_run / "sae" / "layer2"
    assert Run(multi_run).at(None).load_config().layer == 2
    single = make_tiny_run("single")  # an ordinary run: today's layout, --layer only names its own block
    assert Run(single).at(None).sae_dir == single / "sae" and Run(single).at(-2).path == single
    assert (single / "cache" / "train" / "manifest.json").exists() and not (single / "layers.json").exists()
    assert cli.main(["evaluate", "--run", str(single), "--layer", "0"]) == 2
    assert "hooks only block -2" in capsys.readouterr().err


def test_analyze_per_layer_does_not_overwrite(multi_run):
    for layer in ("-1", "0"):
        assert cli.main(["analyze", "--run", str(multi_run), "--layer", layer, "--max-images", "40"]) == 0
    a2 = json.loads((multi_run / "analysis" / "layer2" / "manifest.json").read_text())
    a0 = json.loads((multi_run / "analysis" / "layer0" / "manifest.json").read_text())
    assert (a2["layer"], a0["layer"]) == (2, 0) and a2["sae_sha256"] != a0["sae_sha256"]
    from patchsae.stages.serve import open_explorer

    ex = open_explorer(str(multi_run), None, 0)  # serve --layer 0 / report --layer 0
    assert ex.layer == 0 and ex.manifest["sae_sha256"] == a0["sae_sha256"]
    assert open_explorer(str(multi_run), None, None).layer == 2


def _analysed(multi_run):
    for layer in ("-1", "0"):  # (test_analyze_per_layer wrote these already when the whole file runs)
        if not Run(multi_run).at(int(layer)).analysis_dir.exists():
            assert cli.main(["analyze", "--run", str(multi_run), "--layer", layer, "--max-images", "40"]) == 0


def _direct_top(ex, img, n=10):
    """Independent top latents of one image at the explorer's block: block output -> its SAE -> mean over tokens."""
    import torch

    model = ex.models["base"]
    with torch.no_grad():
        h_TD = model.block_output(model.preprocess([img]), ex.layer)[0]
        vals, ids = ex.sae.encode(h_TD[model.layout().image_token_mask()]).mean(0).topk(n)
    return [int(i) for i, v in zip(ids, vals) if v > 0], vals


def test_explorer_api_switches_block(multi_run):
    """serve on a multi-layer run: /api/info lists the analysed blocks, POST /api/layer/L switches, and every later
    request reads block L's SAE and analysis (checked against a direct computation at each block)."""
    from fastapi.testclient import TestClient

    from patchsae.explorer.server import create_app
    from patchsae.stages.serve import open_blocks, open_explorer

    _analysed(multi_run)
    client = TestClient(create_app(open_blocks(str(multi_run), None, None)))
    info = client.get("/api/info").json()
    assert (info["layers"], info["layer"]) == ([2, 0], 2)
    img, _ = FashionMNIST("test").load(3)
    tops = {}
    for layer in (2, 0, 2):
        assert client.post(f"/api/layer/{layer}").json()["layer"] == layer
        got = client.post("/api/analyze/dataset/3").json()["models"]["base"]["top_latents"]
        ex = open_explorer(str(multi_run), None, layer)
        ids, vals = _direct_top(ex, img)
        assert [g["latent"] for g in got] == ids
        np.testing.assert_allclose([g["activation"] for g in got], vals[: len(got)].numpy(), atol=1e-4)
        lat = client.get(f"/api/latents/{ids[0]}").json()  # that block's analysis, not the other's
        assert lat["fired_images"] == int(ex.stats["fired_S"][ids[0]])
        tops.setdefault(layer, got)
    assert tops[2] != tops[0]
    assert client.post("/api/layer/2").json()["layer"] == 2  # switching back reads block 2 again
    r = client.post("/api/layer/1")
    assert r.status_code == 400 and "not one of this run's analysed blocks [2, 0]" in r.json()["error"]
    assert client.get("/api/info").json()["layer"] == 2  # a refused switch changes nothing


def test_complete_block_caches_are_kept(tiny, tmp_path):
    """Adding a block to blocks already cached extracts only the new one; the old folder is left untouched."""
    ds = FashionMNIST("test")
    kw = dict(batch_size=BATCH, shard_images=SHARD, max_images=N_IMAGES, progress=False)
    build_cache(tiny, ds, 0, tmp_path / "b0", **kw)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b0").iterdir()}
    calls = []
    handle = tiny.blocks[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        build_caches(tiny, ds, [0, 1], [tmp_path / "b0", tmp_path / "b1"], **kw)
    finally:
        handle.remove()
    assert calls == [] and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b0").iterdir()} == before
    build_cache(tiny, ds, 1, tmp_path / "ref1", **kw)
    assert _shard_bytes(tmp_path / "b1") == _shard_bytes(tmp_path / "ref1")


def test_dry_run_budget_counts_every_block():
    from dataclasses import replace

    from patchsae.runs.presets import budget, preset_config

    one = budget(preset_config("paper"))
    three = budget(replace(preset_config("paper"), layers=("-2", "-5", "-8")))
    assert three["blocks"] == [10, 7, 4] and three["hooked_block"] == one["hooked_block"] == 10
    assert three["cache_bytes_fp16"] == 3 * one["cache_bytes_fp16"] and three["steps"] == one["steps"]


def test_browser_block_selector(multi_run):
    """The page of a multi-layer run shows a block selector; choosing a block reloads the page on that block's SAE."""
    from test_explorer import CHROMIUM, CHROMIUM_ARGS, start_server

    from patchsae.stages.serve import open_blocks, open_explorer

    playwright = pytest.importorskip("playwright.sync_api")
    _analysed(multi_run)
    url, stop = start_server(open_blocks(str(multi_run), None, None))
    try:
        with playwright.sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = b.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']")
            assert page.is_visible("#layer") and page.eval_on_selector_all(
                "#layer option", "os => os.map(o => o.value)") == ["2", "0"]
            assert page.input_value("#layer") == "2" and "block 2" in page.inner_text("#run-info")
            with page.expect_navigation():
                page.select_option("#layer", "0")
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#layer") == "0" and "block 0" in page.inner_text("#run-info")
            img0, _ = FashionMNIST("test").load(0)
            want, _ = _direct_top(open_explorer(str(multi_run), None, 0), img0)
            page.wait_for_selector("#image-latents .bar")
            assert int(page.get_attribute("#image-latents .bar >> nth=0", "data-latent")) == want[0]
            assert errors == []
            b.close()
    finally:
        stop()
