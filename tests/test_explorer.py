"""The explorer: its JSON API against independent computations, upload safety and path traversal, the two-model
view with a genuinely different second model, steering, the static report (every link resolves), and the page
driven in a real headless browser (Debian chromium through Playwright)."""

from __future__ import annotations

import copy
import io
import json
import re
import socket
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from patchsae import PatchSAEError, cli
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.analysis.kinds import KINDS
from patchsae.explorer.report import write_report
from patchsae.explorer.server import create_app
from patchsae.explorer.session import Explorer, split_common
from patchsae.models.clip import ClipModel, TokenLayout
from patchsae.runs import Run, RunConfig
from patchsae.stages.analyze import AnalyzeOptions
from patchsae.stages.analyze import run as stage_analyze
from patchsae.sae.checkpoint import save_sae
from patchsae.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """A run on the tiny CLIP with a random SAE (some latents dead) and `analyze` on 40 test images."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc[:4] = -1e4
        sae.b_enc[4:] = -torch.arange(60) / 60  # graded sparsity: some latents rare enough not to be dense
    run = Run(tmp_path_factory.mktemp("explorer") / "run")
    run.init(RunConfig(model=str(tiny_clip_dir)), {})
    save_sae(run.sae_dir, sae)
    stage_analyze(run, AnalyzeOptions(max_images=40, batch_size=40, k=5, n_grid=2, min_count=5), progress=False)
    return run.path


class Prompted(ClipModel):
    """A second, genuinely different model of the kind MaPLe makes: perturbed vision weights and two visual
    prompt tokens inserted after CLS (so the token layout has n_prompt = 2 between CLS and the patches)."""

    def __init__(self, clip: ClipModel):
        hf = copy.deepcopy(clip.hf)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in hf.vision_model.encoder.layers.parameters():
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        super().__init__(hf, clip.tokenizer, clip.preprocess, clip.name + "+perturbed", clip.templates)
        self.prompt_2D = torch.randn(2, self.d_model, generator=g)

    def layout(self):
        base = super().layout()
        return TokenLayout(base.n_cls, 2, base.grid)

    def _embed(self, pixels_BCHW):
        h_BTD = self.vision.embeddings(pixels_BCHW.to(self.device))
        p_BND = self.prompt_2D.expand(len(h_BTD), -1, -1)
        return self.vision.pre_layrnorm(torch.cat([h_BTD[:, :1], p_BND, h_BTD[:, 1:]], 1))


@pytest.fixture(scope="module")
def ex(run_dir) -> Explorer:
    return Explorer(Run(run_dir))


@pytest.fixture(scope="module")
def ex2(run_dir) -> Explorer:
    return Explorer(Run(run_dir), Prompted)


@pytest.fixture(scope="module")
def client(ex):
    from fastapi.testclient import TestClient

    return TestClient(create_app(ex, max_upload=200_000))


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def codes(ex: Explorer, img: Image.Image, key: str = "base") -> torch.Tensor:
    """Independent f_TS: the hooked block's output at CLS + patch tokens, encoded by the SAE."""
    model = ex.models[key]
    with torch.no_grad():
        h_TD = model.block_output(model.preprocess([img]), ex.layer)[0]
        return ex.sae.encode(h_TD[model.layout().image_token_mask()])


def probs_of(ex: Explorer, emb_1E: torch.Tensor, key: str = "base") -> torch.Tensor:
    model = ex.models[key]
    return torch.softmax(model.hf.logit_scale.exp() * model.logits(emb_1E, ex.heads[key])[0], -1)


# ---- API ---------------------------------------------------------------------------------------------------

def test_upload_top_latents_patches_and_predictions_match_direct_computation(client, ex):
    img, label = FashionMNIST("test").load(7)
    r = client.post("/api/analyze", files={"file": ("shoe.png", png_of(img), "image/png")})
    assert r.status_code == 200, r.text
    a = r.json()
    f_TS = codes(ex, img)
    vals, ids = f_TS.mean(0).topk(10)
    got = a["models"]["base"]["top_latents"]
    assert [g["latent"] for g in got] == [int(i) for i, v in zip(ids, vals) if v > 0]
    np.testing.assert_allclose([g["activation"] for g in got], vals[: len(got)].numpy(), atol=1e-4)
    assert got[0]["name"] == ex.name(got[0]["latent"]) != ""
    mean_act_S = ex.stats["mean_act_S"]
    for g in got:  # beside the raw value: the value relative to the latent's typical image-level activation
        assert g["relative"] == pytest.approx(g["activation"] / float(mean_act_S[g["latent"]]), rel=1e-3, abs=1e-3)
        assert g["kind"] == ex.kind_names[g["latent"]] and g["label"] == ex.label(g["latent"])
    img_S = f_TS.mean(0)
    rel_S = torch.where(mean_act_S > 0, img_S / mean_act_S.clamp_min(1e-30), 0.0)
    by_rel = a["models"]["base"]["top_relative"]
    assert [g["latent"] for g in by_rel] == [int(i) for i, v in zip(*reversed(rel_S.topk(10))) if v > 0]
    assert a["grid"] == [7, 7] and len(a["models"]["base"]["patches"]) == 49
    p_vals, p_ids = f_TS[1 + 3 * 7 + 5].topk(3)  # patch (3, 5)
    assert [p["latent"] for p in a["models"]["base"]["patches"][3 * 7 + 5]] == [int(i) for i, v in
                                                                              zip(p_ids, p_vals) if v > 0]
    pr = probs_of(ex, ex.models["base"].image_features(ex.models["base"].preprocess([img])))
    top = pr.topk(5)
    assert [p["index"] for p in a["models"]["base"]["predictions"]] == top.indices.tolist()
    np.testing.assert_allclose([p["prob"] for p in a["models"]["base"]["predictions"]], top.values.numpy(), atol=1e-4)
    # the same image picked from the dataset gives the same answer, and carries its label
    d = client.post("/api/analyze/dataset/7").json()
    assert d["image_id"] == "ds-7" and d["label"] == ex.class_names[label]
    assert d["models"]["base"]["top_latents"] == got


def test_patch_endpoint_ranks_one_patch(client, ex):
    img, _ = FashionMNIST("test").load(3)
    f_TS = codes(ex, img)
    client.post("/api/analyze/dataset/3")
    r = client.get("/api/images/ds-3/patch", params={"row": 6, "col": 0, "n": 4})
    vals, ids = f_TS[1 + 6 * 7 + 0].topk(4)
    assert [x["latent"] for x in r.json()["models"]["base"]["top_latents"]] == [int(i) for i, v in zip(ids, vals)
                                                                                 if v > 0]
    bad = client.get("/api/images/ds-3/patch", params={"row": 7, "col": 0})
    assert bad.status_code == 400 and "outside the 7x7 grid" in bad.json()["error"]


def test_latent_endpoint_serves_the_analysis(client, ex, run_dir):
    from safetensors.torch import load_file

    t = load_file(str(run_dir / "analysis" / "stats.safetensors"))
    l = int(torch.argmax(t["frequency_S"] * (t["fired_S"] > 0)))
    d = client.get(f"/api/latents/{l}").json()
    assert d["frequency"] == pytest.approx(float(t["frequency_S"][l]), abs=1e-6)
    assert d["mean_activation"] == pytest.approx(float(t["mean_act_S"][l]), abs=1e-4)
    assert d["entropy"] == pytest.approx(float(t["entropy_S"][l]), abs=1e-4)
    assert [c["count"] for c in d["class_counts"]] == t["class_counts_CS"][:, l].tolist()
    assert [r["index"] for r in d["references"]] == [int(i) for i in t["top_index_SK"][l] if i >= 0]
    assert len(d["references"]) > 0 and d["analysed_images"] == 40
    vocab = json.loads((run_dir / "analysis" / "manifest.json").read_text())["naming"]["vocabulary"]
    assert d["names"][0]["name"] == vocab[int(t["name_index_SN"][l, 0])]
    for bad in (64, -1):
        r = client.get(f"/api/latents/{bad}")
        assert r.status_code == 400 and "does not exist" in r.json()["error"]


def test_images_heatmaps_and_segmentations(client, ex):
    client.post("/api/analyze/dataset/2")
    l = client.post("/api/analyze/dataset/2").json()["models"]["base"]["top_latents"][0]["latent"]
    pics = {}
    for kind in ("image", "heatmap", "segmentation"):
        r = client.get("/api/images/ds-2/image.png", params={"latent": l, "kind": kind})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        pics[kind] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float)
        assert pics[kind].shape == (224, 224, 3)
    assert np.abs(pics["heatmap"] - pics["image"]).mean() > 5
    assert pics["segmentation"].mean() <= pics["image"].mean() + 1  # the image times a map in [0, 1]
    assert client.get("/api/images/ds-2/image.png", params={"kind": "blur", "latent": l}).status_code == 400
    assert client.get("/api/images/ds-2/image.png", params={"kind": "heatmap"}).status_code == 400
    r = client.get("/api/images/0123456789abcdef/image.png")
    assert r.status_code == 404 and "unknown image id" in r.json()["error"]


def test_search_and_browse(client, ex):
    res = client.get("/api/latents", params={"limit": 1000}).json()
    browse = res["latents"]
    ids = [r["latent"] for r in browse]
    kinds_S = ex.stats["kind_S"].tolist()
    # by default: class-selective latents first, by their largest class share, then the other live ones; no
    # dense, positional or dead latent (0..3 are dead)
    assert {r["kind"] for r in browse} <= {"class-selective", "other"}
    assert sorted(ids) == [l for l, k in enumerate(kinds_S) if KINDS[k] in ("class-selective", "other")]
    rank = [("class-selective", "other").index(r["kind"]) for r in browse]
    assert rank == sorted(rank)
    for kind in ("class-selective", "other"):
        part = [(-r["class_share"], r["entropy"], -r["frequency"]) for r in browse if r["kind"] == kind]
        assert part == sorted(part)
    hidden = {k: sum(KINDS[x] == k for x in kinds_S) for k in ("positional", "dense")}
    assert res["hidden"] == hidden and res["shown"] == ["class-selective", "other"]
    every = client.get("/api/latents", params={"limit": 1000, "show": "all"}).json()
    assert every["total"] == int((ex.stats["fired_S"] > 0).sum()) and every["hidden"] == {}
    assert [r["latent"] for r in every["latents"][: len(ids)]] == ids
    bad = client.get("/api/latents", params={"show": "dead"})
    assert bad.status_code == 400 and "kinds to show" in bad.json()["error"]
    assert client.get("/api/latents", params={"q": "17"}).json()["latents"][0]["latent"] == 17
    name = ex.name(ids[0])
    hits = client.get("/api/latents", params={"q": name.upper(), "limit": 1000}).json()
    assert hits["total"] >= 1 and ids[0] in [r["latent"] for r in hits["latents"]]
    assert all(any(name in n.lower() for n, _ in ex.names[r["latent"]]) for r in hits["latents"])
    assert client.get("/api/latents", params={"q": "no such concept"}).json()["total"] == 0


def test_class_latents_by_specificity_and_by_count(client, ex):
    counts_CS = ex.stats["class_counts_CS"]
    r = client.get("/api/classes/4", params={"n": 5, "order": "count"}).json()
    assert [x["count"] for x in r["latents"]] == counts_CS[4].topk(5).values[: len(r["latents"])].tolist()
    assert r["class"] == ex.class_names[4]
    spec = client.get("/api/classes/4", params={"n": 100}).json()  # the default: the class's share first
    assert spec["order"] == "specificity" and spec["latents"]
    rate_CS = counts_CS.double() / ex.stats["class_images_C"].double().clamp_min(1)[:, None]
    share_S = rate_CS[4] / rate_CS.sum(0).clamp_min(1e-30)
    for x in spec["latents"]:
        assert x["share"] == pytest.approx(float(share_S[x["latent"]]), abs=1e-4) and x["count"] > 0
        assert int(counts_CS[:, x["latent"]].sum()) >= ex.manifest["kinds"]["thresholds"]["min_count"]
    shares = [(float(share_S[x["latent"]]), x["count"]) for x in spec["latents"]]
    for (s1, c1), (s2, c2) in zip(shares, shares[1:]):  # share first, then count among equal shares
        assert s1 >= s2 - 1e-6 and (abs(s1 - s2) > 1e-6 or c1 >= c2)
    assert client.get("/api/classes/10").status_code == 400
    assert client.get("/api/classes/1", params={"order": "size"}).status_code == 400


def test_steering_matches_splicing_by_hand(client, ex):
    img, _ = FashionMNIST("test").load(5)
    client.post("/api/analyze/dataset/5")
    model = ex.models["base"]
    f_TS = codes(ex, img)
    l = int(f_TS.mean(0).argmax())
    same = client.post("/api/steer", json={"image_id": "ds-5", "latent": l, "scale": 1.0}).json()
    assert same["steered"] == same["original"] and same["tokens"] == 50
    d_D = ex.sae.W_dec[l] / ex.sae.input_scale
    h_1TD = model.block_output(model.preprocess([img]), ex.layer)
    for scale, patches in ((0.0, None), (4.0, [[2, 3], [5, 5]])):
        r = client.post("/api/steer", json={"image_id": "ds-5", "latent": l, "scale": scale, "patches": patches})
        assert r.status_code == 200, r.text
        toks = list(range(50)) if patches is None else [1 + 2 * 7 + 3, 1 + 5 * 7 + 5]
        h = h_1TD.clone()
        h[0, toks] += (scale - 1) * f_TS[toks, l, None] * d_D
        want = probs_of(ex, model.finish_from(h, ex.layer)).topk(5)
        got = r.json()["steered"]
        assert [p["index"] for p in got] == want.indices.tolist()
        np.testing.assert_allclose([p["prob"] for p in got], want.values.numpy(), atol=1e-4)
        assert got != r.json()["original"]
    for bad in ({"patches": [[9, 0]]}, {"patches": []}, {"scale": -1}, {"latent": 99}, {"model": "adapted"}):
        body = {"image_id": "ds-5", "latent": l, "scale": 2.0, **bad}
        r = client.post("/api/steer", json=body)
        assert r.status_code == 400 and r.json()["error"], bad


def test_bad_uploads_get_a_4xx_with_a_message(client):
    cases = [
        (("notes.txt", b"just some text", "text/plain"), 415, "not an image"),
        (("fake.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "image/png"), 415, "not an image"),
        (("empty.png", b"", "image/png"), 415, "empty"),
    ]
    for file, status, words in cases:
        r = client.post("/api/analyze", files={"file": file})
        assert r.status_code == status and words in r.json()["error"], r.text
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    big = png_of(noise)
    assert len(big) > 200_000
    r = client.post("/api/analyze", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "200,000 bytes" in r.json()["error"]
    chunks = iter([b"x" * 50_000] * 10)  # no Content-Length: counted as it arrives
    r = client.post("/api/analyze", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    r = client.post("/api/analyze", data={"path": "/etc/passwd"})
    assert r.status_code == 422 and "file" in r.json()["error"]


def test_no_path_traversal(client, run_dir):
    assert client.get("/api/figures/latent_scatter.png").status_code == 200
    for url in ["/static/%2e%2e/session.py", "/static/..%2fsession.py", "/static/%2e%2e/%2e%2e/cli.py",
                "/api/figures/..%2Fconfig.json", "/api/figures/%2e%2e%2fanalysis%2fmanifest.json",
                "/api/figures/config.json", "/api/images/..%2F..%2Fconfig.json/image.png",
                "/api/images/ds-1%2F..%2F..%2Fconfig.json/image.png", f"/static/{run_dir}/config.json"]:
        r = client.get(url)
        assert r.status_code == 404, url
        assert '"model"' not in r.text and "import" not in r.text, url
    assert client.get("/static/app.js").status_code == 200
    assert "patchsae explorer" in client.get("/").text


def test_image_memory_is_bounded(run_dir):
    small = Explorer(Run(run_dir), max_images=5, max_bytes=3 * (50 * 64 + 3 * 28 * 28) * 4)
    for i in range(6):
        small.add_dataset(i)
    assert list(small._images) == ["ds-3", "ds-4", "ds-5"]  # the byte budget holds three
    small.entry("ds-0")  # a forgotten dataset image is recomputed on demand
    assert list(small._images) == ["ds-4", "ds-5", "ds-0"]
    with pytest.raises(KeyError):
        small.entry("0123456789abcdef")


def test_info_describes_the_run(client, ex):
    i = client.get("/api/info").json()
    assert i["d_sae"] == 64 and i["grid"] == [7, 7] and i["class_names"][0] == "t-shirt"
    alive = int((ex.stats["fired_S"] > 0).sum())
    assert 50 <= alive <= 60 and i["alive_latents"] == alive  # 4 latents dead by construction, a few by bias
    assert not i["adapted"] and {"latent_scatter.png", "latent_kinds.png"} <= set(i["figures"])
    assert sum(i["kinds"].values()) == 64 and i["kinds"]["dead"] == 64 - alive
    assert i["kind_thresholds"]["min_count"] == 5 and i["shown_by_default"] == ["class-selective", "other"]


# ---- two models --------------------------------------------------------------------------------------------

def test_split_common():
    assert split_common([5, 1, 7], [7, 2, 5, 9]) == {"common": [5, 7], "base_only": [1], "adapted_only": [2, 9]}


def test_two_model_view_reads_both_models(ex2):
    from fastapi.testclient import TestClient

    c = TestClient(create_app(ex2))
    img, _ = FashionMNIST("test").load(11)
    a = c.post("/api/analyze", files={"file": ("x.png", png_of(img), "image/png")}).json()
    lists = {}
    for key in ("base", "adapted"):
        vals, ids = codes(ex2, img, key).mean(0).topk(10)
        lists[key] = [int(i) for i, v in zip(ids, vals) if v > 0]
        assert [r["latent"] for r in a["models"][key]["top_latents"]] == lists[key]
    assert lists["base"] != lists["adapted"]  # the second model is genuinely different
    g = a["groups"]
    assert g == split_common(lists["base"], lists["adapted"])
    assert sorted(g["common"] + g["base_only"]) == sorted(lists["base"])
    assert sorted(g["common"] + g["adapted_only"]) == sorted(lists["adapted"])
    iid, l = a["image_id"], lists["base"][0]
    maps = [c.get(f"/api/images/{iid}/image.png", params={"latent": l, "kind": "heatmap", "model": m}).content
            for m in ("base", "adapted")]
    assert maps[0] != maps[1]
    p = c.get(f"/api/images/{iid}/patch", params={"row": 1, "col": 1}).json()
    assert set(p["models"]) == {"base", "adapted"}
    r = c.post("/api/steer", json={"image_id": iid, "latent": l, "scale": 1.0, "model": "adapted"}).json()
    assert r["steered"] == r["original"] and r["model"] == "adapted" and r["tokens"] == 50
    # steering one patch of the adapted model: its token sits after CLS and the 2 prompt tokens
    model, f_TS = ex2.models["adapted"], codes(ex2, img, "adapted")
    l = int(f_TS[1 + 4 * 7 + 2].argmax())
    r = c.post("/api/steer", json={"image_id": iid, "latent": l, "scale": 30.0, "patches": [[4, 2]],
                                   "model": "adapted"}).json()
    h = model.block_output(model.preprocess([img]), ex2.layer)
    assert h.shape[1] == 52
    h[0, 3 + 4 * 7 + 2] += 29 * f_TS[1 + 4 * 7 + 2, l] * ex2.sae.W_dec[l] / ex2.sae.input_scale
    want = probs_of(ex2, model.finish_from(h, ex2.layer), "adapted").topk(5)
    assert [p["index"] for p in r["steered"]] == want.indices.tolist()
    np.testing.assert_allclose([p["prob"] for p in r["steered"]], want.values.numpy(), atol=1e-4)
    before = {p["index"]: p["prob"] for p in r["original"]}
    assert max(abs(p["prob"] - before.get(p["index"], 0)) for p in r["steered"]) > 3e-4  # a change beyond the tolerance
    assert c.get("/api/info").json()["adapted_model"].endswith("+perturbed")


# ---- command line ------------------------------------------------------------------------------------------

def test_serve_needs_analysis_and_readable_prompts(tmp_path, run_dir, capsys):
    bare = tmp_path / "bare"  # the same run without its analysis/
    bare.mkdir()
    (bare / "config.json").write_bytes((Path(run_dir) / "config.json").read_bytes())
    (bare / "sae").symlink_to(Path(run_dir) / "sae")
    assert cli.main(["serve", "--run", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"patchsae analyze --run {bare}" in err
    assert cli.main(["report", "--run", str(run_dir), "--out", str(tmp_path / "s"), "--adapted", "p.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MaPLe prompts p.pt: no such file" in err


def test_two_model_view_with_saved_maple_prompts(tmp_path, run_dir):
    """--adapted with prompts written by `patchsae adapt`: the second model carries MaPLe's visual prompt tokens
    and the SAE reads its CLS + patch tokens only."""
    from fastapi.testclient import TestClient

    from patchsae.models.maple import MapleConfig, build_maple, load_adapted, save_prompts

    run = Run(run_dir)
    base = Explorer(run).models["base"]
    maple = build_maple(base, MapleConfig(n_ctx=2, depth=2), seed=3)
    with torch.no_grad():
        for p in maple.prompts.parameters():
            p.add_(0.5 * torch.randn_like(p))
    save_prompts(tmp_path / "prompts", maple)
    ex = Explorer(run, lambda clip: load_adapted(clip, tmp_path / "prompts"))
    c = TestClient(create_app(ex))
    img, _ = FashionMNIST("test").load(5)
    a = c.post("/api/analyze", files={"file": ("x.png", png_of(img), "image/png")}).json()
    adapted = ex.models["adapted"]
    assert adapted.layout().kinds().count("prompt") == 2
    vals, ids = codes(ex, img, "adapted").mean(0).topk(10)
    assert [r["latent"] for r in a["models"]["adapted"]["top_latents"]] == [int(i) for i, v in zip(ids, vals) if v > 0]
    assert "+maple:" in c.get("/api/info").json()["adapted_model"]


# ---- static report -----------------------------------------------------------------------------------------

class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src") and v]


def local_links(site: Path) -> dict[Path, list[str]]:
    out = {}
    for page in site.rglob("*.html"):
        p = Links()
        p.feed(page.read_text())
        out[page] = p.links
    return out


@pytest.fixture(scope="module")
def site(ex, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "site"
    info = write_report(ex, out, top=4)
    assert info["class_pages"] == 10 and info["latent_pages"] >= 4
    return out


def test_serve_and_report_commands(run_dir, tmp_path, monkeypatch, capsys):
    import uvicorn

    from patchsae.explorer import server as server_module

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    with monkeypatch.context() as m:  # the default port may be in use by a real explorer on this machine
        m.setattr(server_module, "check_listen", lambda host, port: seen.update(checked=(host, port)))
        assert cli.main(["serve", "--run", str(run_dir)]) == 0
    assert seen["checked"] == ("127.0.0.1", 7860)
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7860 and seen["app"].limit == 10 * 2**20
    assert "http://127.0.0.1:7860/" in capsys.readouterr().out
    assert cli.main(["serve", "--run", str(run_dir), "--port", "9001", "--max-upload-mb", "0"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--run", str(run_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    out = tmp_path / "site"
    assert cli.main(["report", "--run", str(run_dir), "--out", str(out), "--top", "2"]) == 0
    assert f"{out / 'index.html'}" in capsys.readouterr().out and (out / "latents").is_dir()
    old = set((out / "latents").iterdir())
    assert cli.main(["report", "--run", str(run_dir), "--out", str(out), "--top", "3"]) == 0  # replaced
    assert len(set((out / "latents").iterdir())) >= len(old) and not list(tmp_path.glob(".site*"))


def test_report_links_resolve_and_data_matches(site, ex):
    pages = local_links(site)
    assert len(pages) == 1 + 10 + len(list((site / "latents").glob("*.html")))
    n = 0
    for page, links in pages.items():
        for link in links:
            if link.startswith("data:"):
                continue
            assert not urlparse(link).scheme and not link.startswith("/"), (page, link)  # relative only
            target = (page.parent / unquote(link.split("#")[0])).resolve()
            assert target.is_file() and site.resolve() in target.parents, (page, link)
            n += 1
    assert n > 100
    data = json.loads((site / "data" / "latents.json").read_text())
    for d in data["latents"][:3]:
        want = ex.latent(d["latent"])
        assert [r["index"] for r in d["references"]] == [r["index"] for r in want["references"]]
        assert d["frequency"] == want["frequency"]
    assert [d["latent"] for d in data["latents"][:4]] == ex.order[:4]


def test_report_refuses_to_overwrite_a_foreign_folder(ex, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(PatchSAEError, match="not a patchsae report"):
        write_report(ex, tmp_path / "mine", top=2)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# ---- in a real browser -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def start_server(explorer: Explorer):
    """The app under uvicorn on a free local port, in a thread; returns (url, stop)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(explorer, max_upload=200_000), host="127.0.0.1", port=port,
                                        log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started

    def stop():
        srv.should_exit = True
        t.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server(ex):
    url, stop = start_server(ex)
    yield url
    stop()


def all_images_loaded(page) -> bool:
    """Waits (up to 10 s) until every image with a src has loaded and decoded; a broken one never does."""
    page.wait_for_function("Array.from(document.images).filter(i => i.src)"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
    return True


def test_browser_upload_click_patch_select_latent_steer(browser, server, ex, tmp_path):
    img, _ = FashionMNIST("test").load(9)
    (tmp_path / "x.png").write_bytes(png_of(img))
    (tmp_path / "notes.txt").write_text("not an image")
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("#latent-list .item")
    assert page.is_hidden("#layer-choice")  # a single-layer run: no block selector

    # the first load, without any click, shows dataset image 0 with its top latents and predictions
    assert "[0]" in page.inner_text("#image-desc") and "ds-0" in page.inner_text("#image-desc")
    img0, _ = ex.ds.load(0)
    assert int(page.get_attribute("#image-latents .bar >> nth=0", "data-latent")) == int(
        codes(ex, img0).mean(0).argmax())
    assert page.locator("#predictions tr").count() == 5
    page.wait_for_function("document.querySelector('#main-img').src.includes('/api/images/ds-0/image.png')")
    assert all_images_loaded(page) and page.evaluate("document.querySelector('#main-img').naturalWidth") > 0

    page.set_input_files("#file", str(tmp_path / "x.png"))
    page.wait_for_function("!document.querySelector('#image-desc').textContent.includes('ds-0')")
    page.wait_for_selector("#image-latents .bar")
    first = int(page.get_attribute("#image-latents .bar >> nth=0", "data-latent"))
    assert first == int(codes(ex, img).mean(0).argmax())
    assert page.locator("#predictions tr").count() == 5

    box = page.locator("#grid").bounding_box()  # click patch (row 2, col 4) of the 7x7 grid
    page.mouse.click(box["x"] + box["width"] * 4.5 / 7, box["y"] + box["height"] * 2.5 / 7)
    page.wait_for_selector("#patch-latents .bar")
    assert page.inner_text("#patch-title") == "Patch (row 2, col 4)"
    p_top = int(page.get_attribute("#patch-latents .bar >> nth=0", "data-latent"))
    assert p_top == int(codes(ex, img)[1 + 2 * 7 + 4].argmax())

    page.click("#patch-latents .bar >> nth=0")
    page.wait_for_selector("#references img")
    assert page.inner_text("#latent-title").startswith(f"Latent #{p_top}")
    n_refs = len(ex.latent(p_top)["references"])
    assert page.locator("#references img").count() == n_refs > 0
    page.wait_for_function("Array.from(document.querySelectorAll('#references img, .heatmaps img'))"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    page.check("input[name=view][value=heatmap]")
    page.wait_for_function("document.querySelector('#main-img').src.includes('kind=heatmap')")

    page.check("input[name=steer-where][value=patches]")
    page.fill("#steer-scale", "0")
    page.click("#steer-run")
    page.wait_for_selector("#steer-result table")
    assert "on 1 tokens" in page.inner_text("#steer-result")

    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in page.inner_text("#error")
    # the kind filter: dense latents are listed only when asked for; relative activations on request
    assert page.locator("#latent-list .badge.kind-dense").count() == 0
    page.check("input[name=show-kind][value=dense]")
    page.wait_for_selector("#latent-list .badge.kind-dense")
    page.check("input[name=image-order][value=relative]")
    page.wait_for_selector("#image-latents .bar .rel")
    page.select_option("#class-order", "count")
    page.wait_for_selector("#class-latents .item")
    page.fill("#search", str(first))
    page.wait_for_function(f"document.querySelector('#latent-list .item')?.dataset.latent === '{first}'")
    page.fill("#ds-index", "3")
    page.click("#ds-load")
    page.wait_for_function("document.querySelector('#image-desc').textContent.includes('[3]')")
    assert page.is_hidden("#error")
    assert all_images_loaded(page) and not errors
    page.close()


def test_browser_report_pages_load(browser, site):
    page = browser.new_page()
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    page.goto((site / "index.html").as_uri())
    assert page.locator("table a").count() >= 4 and all_images_loaded(page)
    page.click("table a >> nth=0")
    page.wait_for_selector(".refs img")
    assert re.search(r"latents/\d+\.html$", page.url) and all_images_loaded(page)
    page.click(".counts a >> nth=0")
    assert page.url.endswith("classes/0.html") and all_images_loaded(page)
    for p in sorted(site.rglob("*.html")):
        page.goto(p.as_uri())
        assert all_images_loaded(page), p
    assert not failed
    page.close()


def test_browser_two_model_view(browser, ex2):
    url, stop = start_server(ex2)
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#ds-index", "11")
        page.click("#ds-load")
        page.wait_for_function("document.querySelector('#image-desc').textContent.includes('[11]')")
        page.wait_for_selector("#image-latents .group")
        heads = page.locator("#image-latents .group h3").all_inner_texts()
        assert [h.split(" (")[0] for h in heads] == ["common", "base only", "adapted only"]
        a = ex2.analyze("ds-11")
        assert heads == [f"common ({len(a['groups']['common'])})", f"base only ({len(a['groups']['base_only'])})",
                         f"adapted only ({len(a['groups']['adapted_only'])})"]
        assert page.locator("#predictions table").count() == 2
        page.click("#image-latents .bar >> nth=0")
        page.wait_for_selector(".heatmaps img[data-model=adapted]")
        assert page.locator(".heatmaps img").count() == 4  # heatmap + segmentation, for each model
        assert all_images_loaded(page)
        page.close()
    finally:
        stop()
