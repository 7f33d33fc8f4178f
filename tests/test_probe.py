"""DINOv2 has no text tower: evaluate, classify and the explorer classify with the run's linear probe.

The probe's fit is checked against scikit-learn's LogisticRegression on the same objective; on a small random
DINOv2 run, every accuracy the stages report is recomputed independently from transformers' own forward pass
(pooler_output, with the SAE's reconstruction spliced by a hook on the library's own encoder layer) and the
stored probe's weights; the explorer's predictions are the probe's softmax on the model's own features."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from patchsae import PatchSAEError, cli
from patchsae.models.classifier import PROBE_L2, LinearProbe
from patchsae.runs import Run
from patchsae.utils import read_json

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=7,
             image_size=28)
N_TRAIN, N_EVAL = 48, 24


def test_probe_fit_is_sklearns_logistic_regression_and_deterministic():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) * [1, 5, 0.1, 2, 3, 1] + [0, 3, -1, 0, 2, 5]
    y = (x[:, 0] + 0.3 * x[:, 1] + rng.normal(size=120) > 1).astype(int) + (x[:, 3] > 1)
    probe = LinearProbe.fit(torch.tensor(x), torch.tensor(y), 3)
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=1 / (PROBE_L2 * len(x)), tol=1e-12, max_iter=10000).fit(z, y)
    np.testing.assert_allclose(probe.W_CE.numpy() - probe.W_CE.numpy().mean(0), ref.coef_ - ref.coef_.mean(0),
                               atol=2e-3)
    np.testing.assert_array_equal(probe.logits(torch.tensor(x)).argmax(-1).numpy(), ref.predict(z))
    again = LinearProbe.fit(torch.tensor(x), torch.tensor(y), 3)
    assert torch.equal(again.W_CE, probe.W_CE) and torch.equal(again.b_C, probe.b_C)


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    from transformers import BitImageProcessorPil, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("probe")
    folder = tmp / "dino"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    run = tmp / "run"
    assert cli.main(["cache", "--run", str(run), "--model", str(folder), "--max-train-images", str(N_TRAIN),
                     "--max-eval-images", str(N_EVAL), "--expansion", "2", "--batch-tokens", "64",
                     "--warmup-steps", "2"]) == 0
    assert cli.main(["train", "--run", str(run)]) == 0
    return run, folder


def _hf_features(folder, split: str, n: int, splice=None):
    """(pooler_output, labels) of the first n images of Fashion-MNIST/split by transformers alone; `splice`
    replaces the hooked block's output through a hook on the library's own encoder layer."""
    from transformers import BitImageProcessorPil, Dinov2WithRegistersModel

    from patchsae.data import open_dataset

    hf = Dinov2WithRegistersModel.from_pretrained(folder).eval()
    proc = BitImageProcessorPil.from_pretrained(folder)
    ds = open_dataset("fashion-mnist", split)
    images, labels = zip(*(ds.load(i) for i in range(n)))
    pixels = proc([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    handle = None
    if splice is not None:
        handle = hf.encoder.layer[-2].register_forward_hook(lambda _m, _i, out: splice(out))
    with torch.no_grad():
        feats = hf(pixel_values=pixels).pooler_output
    if handle is not None:
        handle.remove()
    return feats, torch.tensor(labels)


def _acc(probe, feats, labels) -> float:
    return float((probe.logits(feats).argmax(-1) == labels).double().mean())


def test_probe_stage_reports_accuracies_an_independent_forward_reproduces(dino_run, capsys):
    run, folder = dino_run
    assert cli.main(["probe", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    probe = LinearProbe.load(Run(run).probe_file)
    assert probe.meta["train_images"] == N_TRAIN and probe.meta["eval_images"] == N_EVAL
    assert probe.meta["train_accuracy"] == _acc(probe, *_hf_features(folder, "train", N_TRAIN))
    assert probe.meta["eval_accuracy"] == _acc(probe, *_hf_features(folder, "test", N_EVAL))
    assert f"test accuracy {probe.meta['eval_accuracy']:.2%}" in out
    mtime = Run(run).probe_file.stat().st_mtime_ns
    assert cli.main(["probe", "--run", str(run)]) == 0  # current: reused, not refitted
    assert Run(run).probe_file.stat().st_mtime_ns == mtime


def test_evaluate_and_classify_use_the_probe(dino_run):
    from patchsae.sae.checkpoint import load_sae

    run, folder = dino_run
    assert cli.main(["evaluate", "--run", str(run)]) == 0
    probe = LinearProbe.load(Run(run).probe_file)
    feats, labels = _hf_features(folder, "test", N_EVAL)
    m = read_json(Run(run).eval_metrics_file)
    assert m["classifier"] == "probe" and m["zero_shot_accuracy"] == _acc(probe, feats, labels)

    sae, _ = load_sae(Run(run).sae_dir, d_model=32)
    kinds = ["cls", "register", "register"] + ["patch"] * 16
    rows = torch.tensor([k != "register" for k in kinds])

    def reconstruct(h_BTD):  # SAE reconstruction at CLS + patches; registers pass through
        out = h_BTD.clone()
        out[:, rows] = sae.decode(sae.encode(h_BTD[:, rows])).to(out.dtype)
        return out

    spliced = _hf_features(folder, "test", N_EVAL, splice=reconstruct)[0]
    assert m["spliced_accuracy"] == pytest.approx(_acc(probe, spliced, labels), abs=1e-9)

    assert cli.main(["classify", "--run", str(run), "--max-eval-images", str(N_EVAL)]) == 0
    manifest = read_json(Run(run).classify_dir / "manifest.json")
    assert manifest["classifier"] == "probe"
    table = {(r["selection"], r["mode"], r["k"]): r for r in
             csv.DictReader((Run(run).classify_dir / "metrics.csv").open())}
    pred = probe.logits(feats).argmax(-1)
    per_class = [float(((pred == labels) & (labels == c)).sum() / max(int((labels == c).sum()), 1))
                 for c in range(10)]
    original = table[("none", "original", "")]
    assert float(original["accuracy"]) == pytest.approx(_acc(probe, feats, labels), abs=1e-6)
    assert [float(original[c]) for c in manifest["class_names"]] == pytest.approx(per_class, abs=1e-6)
    recon = _acc(probe, spliced, labels)
    assert float(table[("none", "reconstruction", "")]["accuracy"]) == pytest.approx(recon, abs=1e-6)
    assert float(table[("class", "on", str(sae.cfg.d_sae))]["accuracy"]) == pytest.approx(recon, abs=1e-6)


def test_the_probe_refuses_classes_it_was_not_fitted_on(dino_run, capsys):
    run, _ = dino_run
    assert cli.main(["probe", "--run", str(run)]) == 0
    before = (Run(run).probe_file.read_bytes(), capsys.readouterr())
    assert cli.main(["classify", "--run", str(run), "--dataset", "digits", "--max-eval-images", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchsae: error: the linear probe in") and "cannot classify" in err
    assert len(err.splitlines()) == 1 and Run(run).probe_file.read_bytes() == before[0]


def test_analyze_names_by_majority_label_and_the_explorer_predicts_with_the_probe(dino_run):
    from patchsae.explorer.session import Explorer

    run, folder = dino_run
    assert cli.main(["analyze", "--run", str(run), "--max-images", str(N_EVAL)]) == 0
    rows = list(csv.DictReader((Run(run).analysis_dir / "latents.csv").open()))
    named = [r for r in rows if r["top_images"]]
    assert named and all(r["name1"] == r["majority_label"] for r in named)
    assert read_json(Run(run).analysis_dir / "manifest.json")["naming"]["method"].startswith("majority label")
    with pytest.raises(PatchSAEError, match="no text tower"):
        from patchsae.stages.analyze import AnalyzeOptions, run as analyze

        analyze(Run(run), AnalyzeOptions(steer=True), progress=False)

    Run(run).probe_file.unlink(missing_ok=True)  # the explorer does not fit it: it says how to
    with pytest.raises(PatchSAEError, match="has no linear probe yet; run `patchsae probe --run"):
        Explorer(Run(run))
    assert cli.main(["probe", "--run", str(run)]) == 0
    probe = LinearProbe.load(Run(run).probe_file)
    ex = Explorer(Run(run))
    got = ex.analyze(ex.add_dataset(3))["models"]["base"]["predictions"]
    feats, _ = _hf_features(folder, "test", 4)
    probs = torch.softmax(probe.logits(feats[3:4]), -1)[0]
    want = probs.topk(5)
    assert [p["index"] for p in got] == want.indices.tolist()
    assert [p["prob"] for p in got] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert ex.info()["classifier"] == "probe"


def test_register_tokens_are_kept_apart_unless_named(tmp_path, dino_run):
    from patchsae.activations.tokens import token_positions

    kinds = ["cls", "register", "register", "patch", "patch"]
    assert token_positions(kinds, "all").tolist() == [0, 3, 4]
    assert token_positions(kinds, "register").tolist() == [1, 2]
    assert token_positions(kinds, "all+register").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(PatchSAEError, match="has none"):
        token_positions(["cls", "patch"], "register")
    run, folder = dino_run
    other = tmp_path / "reg"
    assert cli.main(["cache", "--run", str(other), "--model", str(folder), "--max-train-images", "8",
                     "--tokens", "register", "--expansion", "2", "--batch-tokens", "8", "--warmup-steps", "1"]) == 0
    assert cli.main(["train", "--run", str(other)]) == 0
    assert read_json(other / "sae" / "config.json")  # trained on the 2 register rows of 8 images
