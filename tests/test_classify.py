"""Top-k masking classification: the mask logic on a hand-made SAE, sparse decoding against the dense
definition, the splice hook and its removal, the fast last block, error-term-kept = original, the k grid,
the text-head cache, metrics.csv, same-split refusal, and `patchsae classify` end to end on a tiny run."""

from __future__ import annotations

import csv

import numpy as np

import pytest
import torch

from patchsae import cli
from patchsae.analysis import counts, grid, rankings
from patchsae.analysis.codes import SparseCodes, spliced
from patchsae.stages.classify import ClassifyOptions
from patchsae.utils import read_json
from patchsae.data.base import FirstN, iter_batches
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.models.load import load_model
from patchsae.models.text_head import cached_text_head
from patchsae.runs import Run
from patchsae.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


def _random_sae(d_model=32, d_sae=64, seed=0) -> SAE:
    torch.manual_seed(seed)
    return SAE(SAEConfig(d_model=d_model, d_sae=d_sae))


def _one_hot_sae(d: int = 6) -> SAE:
    """d_model = d_sae = d, W_enc = W_dec = identity, no biases: latent s fires with value x[s] (if > 0) and
    decodes to x[s] e_s, so which latents a mask keeps can be read off the reconstruction."""
    sae = SAE(SAEConfig(d_model=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ---- masks ---------------------------------------------------------------------------------------------------

def test_rank_positions_and_k_grid():
    counts_CS = torch.tensor([[5, 0, 9, 1], [0, 7, 7, 3]])
    pos_CS = rankings.rank_positions(counts_CS)
    assert pos_CS.tolist() == [[1, 3, 0, 2], [3, 0, 1, 2]]  # ties keep latent order
    assert rankings.rank_positions(counts_CS.sum(0)).tolist() == [2, 1, 0, 3]
    assert sorted(rankings.random_positions(10, 1).tolist()) == list(range(10))
    assert torch.equal(rankings.random_positions(10, 1), rankings.random_positions(10, 1))
    assert not torch.equal(rankings.random_positions(10, 1), rankings.random_positions(10, 2))
    assert rankings.k_values(1536) == [1, 2, 5, 10, 50, 100, 500, 1000, 1536]
    assert rankings.k_values(8) == [1, 2, 5, 8]
    assert rankings.k_values(49152)[-2:] == [2000, 49152]


def test_class_masks_keep_exactly_the_ranked_latents_of_each_images_class():
    sae = _one_hot_sae(6)
    x_BTD = torch.tensor([[[1.0, 2, 3, 4, 5, 6]], [[6.0, 5, 4, 3, 2, 1]]]).repeat(1, 2, 1)  # 2 images, 2 tokens
    labels_B = torch.tensor([0, 1])
    counts_CS = torch.tensor([[0, 0, 9, 8, 0, 1],  # class 0 ranks latents 2, 3, 5, ...
                              [7, 0, 0, 0, 9, 0]])  # class 1 ranks latents 4, 0, ...
    pos_BS = rankings.image_positions(rankings.rank_positions(counts_CS), labels_B)
    codes = SparseCodes(sae, x_BTD)
    for k, mode, kept in [(1, "on", [{2}, {4}]), (2, "on", [{2, 3}, {4, 0}]), (3, "on", [{2, 3, 5}, {4, 0, 1}]),
                          (2, "off", [{0, 1, 4, 5}, {1, 2, 3, 5}]), (6, "on", [set(range(6))] * 2),
                          (6, "off", [set(), set()])]:
        dense_BTS = rankings.masked_latents(sae.encode(x_BTD), pos_BS, k, mode)
        sparse_BTD = codes.decode(rankings.keep_mask(codes.positions(pos_BS), k, mode))
        torch.testing.assert_close(sparse_BTD, sae.decode(dense_BTS))
        for b in range(2):
            want = torch.zeros(6)
            want[list(kept[b])] = x_BTD[b, 0, list(kept[b])]
            torch.testing.assert_close(sparse_BTD[b], want.expand(2, 6), msg=f"{k} {mode} image {b}")
    # a shared (dataset-level) ranking gives every image the same latents
    pos_BS = rankings.image_positions(rankings.rank_positions(counts_CS.sum(0)), labels_B)
    assert torch.equal(pos_BS[0], pos_BS[1])


def test_sparse_decoding_matches_dense_masks_on_a_random_sae(monkeypatch):
    monkeypatch.setattr("patchsae.analysis.codes.ENCODE_ELEMENTS", 3 * 5 * 64)  # encode in chunks of 3 images
    sae = _random_sae()
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.2)
    x_BTD = torch.randn(7, 5, 32)
    labels_B = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    codes = SparseCodes(sae, x_BTD)
    assert codes.id_BTK.shape[-1] < 64
    torch.testing.assert_close(codes.decode(), sae.decode(sae.encode(x_BTD)), rtol=1e-5, atol=1e-5)
    pos_BS = rankings.image_positions(rankings.rank_positions(torch.randint(0, 50, (3, 64))), labels_B)
    for k in (1, 10, 64):
        for mode in ("on", "off"):
            want = sae.decode(rankings.masked_latents(sae.encode(x_BTD), pos_BS, k, mode))
            got = codes.decode(rankings.keep_mask(codes.positions(pos_BS), k, mode))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- splicing ------------------------------------------------------------------------------------------------

def test_splice_hook_changes_only_the_hooked_block_and_is_removed(tiny):
    model, sae = tiny, _random_sae()
    pixels, _, _ = next(iter_batches(FirstN(FashionMNIST("test"), 6), model.preprocess, 6))
    before = model.image_features(pixels)
    below = model.block_output(pixels, 0)
    h_BTD = model.block_output(pixels, 1)
    keep_S = torch.zeros(64)
    keep_S[:20] = 1
    with spliced(model, sae, 1, keep_S):
        torch.testing.assert_close(model.block_output(pixels, 0), below)  # blocks below: untouched
        inside = model.image_features(pixels)
        hooked = model.block_output(pixels, 1)
    want_h = sae.decode(sae.encode(h_BTD) * keep_S)
    torch.testing.assert_close(hooked, want_h)
    torch.testing.assert_close(inside, model.finish_from(want_h, 1))
    assert not torch.allclose(inside, before)
    torch.testing.assert_close(model.image_features(pixels), before, rtol=0, atol=0)  # hook gone


def test_fast_last_block_equals_finish_from(tiny):
    pixels, _, _ = next(iter_batches(FirstN(FashionMNIST("test"), 5), tiny.preprocess, 5))
    for layer in (0, 1):  # two blocks left, one block left
        h_BTD = tiny.block_output(pixels, layer)
        finish, fast = tiny.finisher(layer, h_BTD[:2])
        assert fast
        torch.testing.assert_close(finish(h_BTD * 0.7), tiny.finish_from(h_BTD * 0.7, layer), rtol=1e-5, atol=1e-5)


def test_grid_baselines_and_error_term(tiny):
    """error_kept equals the original; 'on all' equals the reconstruction; 'off all' leaves only b_dec."""
    model, sae = tiny, _random_sae()
    ds = FirstN(FashionMNIST("test"), 40)
    head_CE = model.text_head(ds.class_names)
    counts_CS = torch.randint(0, 30, (10, 64))
    opts = ClassifyOptions(batch_size=16, seeds=(0, 1))
    tally, info = grid.classify_grid(model, sae, ds, -2, head_CE, counts_CS, opts.ks, opts.seeds, opts.max_eval_images,
                                     opts.batch_size, progress=False)
    rows = grid.result_rows(tally, info["ks"], opts.seeds)
    acc = {(r["selection"], r["mode"], r["k"]): r["accuracy"] for r in rows}
    assert info["ks"] == [1, 2, 5, 10, 50, 64] and info["images"] == 40
    assert acc[("none", "error_kept", None)] == acc[("none", "original", None)]
    for sel in ("class", "dataset", "random"):
        assert acc[(sel, "on", 64)] == acc[("none", "reconstruction", None)]
        assert acc[(sel, "off", 64)] == acc[("class", "off", 64)]
    # the unspliced predictions are the model's own
    pixels, labels, _ = next(iter_batches(ds, model.preprocess, 40))
    pred = model.logits(model.image_features(pixels), head_CE).argmax(-1)
    assert acc[("none", "original", None)] == pytest.approx((pred == labels).float().mean().item())
    random_rows = [r for r in rows if r["selection"] == "random"]
    assert all(len(r["seed_accuracies"]) == 2 for r in random_rows)
    assert all(r["accuracy"] == pytest.approx(sum(r["seed_accuracies"]) / 2) for r in random_rows)


def test_text_head_is_cached_by_model_classes_and_templates(tiny, tmp_path, monkeypatch):
    path = tmp_path / "classify" / "text_head.safetensors"
    head = cached_text_head(tiny, ["a", "b"], path)
    calls = []
    monkeypatch.setattr(tiny, "text_head", lambda names, **_: calls.append(names) or torch.zeros(len(names), 16))
    torch.testing.assert_close(cached_text_head(tiny, ["a", "b"], path), head)
    assert calls == []
    assert cached_text_head(tiny, ["a", "c"], path).abs().sum() == 0 and calls == [["a", "c"]]


# ---- the command line ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(make_tiny_run):
    return make_tiny_run("classify")


def test_same_split_is_refused(quick_run, capsys):
    capsys.readouterr()
    assert cli.main(["classify", "--run", str(quick_run), "--rank-split", "test", "--max-eval-images", "20"]) == 2
    err = capsys.readouterr().err
    assert "same split 'test'" in err and "--allow-same-split" in err and len(err.strip().splitlines()) == 1
    assert not (quick_run / "classify" / "metrics.csv").exists()


def test_cli_classify_end_to_end(quick_run, capsys):
    capsys.readouterr()
    assert cli.main(["classify", "--run", str(quick_run), "--max-rank-images", "120", "--max-eval-images", "50",
                     "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "ranked on train (120 images" in out and "class on" in out and "random off" in out
    rows = list(csv.reader((quick_run / "classify" / "metrics.csv").open()))
    assert rows[0] == ["selection", "mode", "k", "accuracy", *FashionMNIST.class_names]
    body = rows[1:]
    assert [r[:3] for r in body[:3]] == [["none", "original", ""], ["none", "reconstruction", ""],
                                         ["none", "error_kept", ""]]
    ks = ["1", "2", "5", "10", "50", "100", "128"]  # d_sae = 4 x 32
    assert [r[:3] for r in body[3:]] == [[s, m, k] for s in ("class", "dataset", "random") for m in ("on", "off")
                                         for k in ks]
    for r in body:
        assert 0.0 <= float(r[3]) <= 1.0 and all(0.0 <= float(a) <= 1.0 for a in r[4:])
    assert body[2][3] == body[0][3]  # error term kept = original
    manifest = read_json(quick_run / "classify" / "manifest.json")
    assert manifest["rank_split"] == "train" and manifest["eval_split"] == "test"
    assert manifest["rank_images"] == 120 and manifest["eval_images"] == 50
    assert manifest["rank_source"].endswith("cache/train")  # the training cache, no second CLIP pass
    assert (quick_run / "classify" / "text_head.safetensors").exists()
    assert (quick_run / "figures" / "masking_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(quick_run.rglob("*.tmp"))

    # a split the cache does not cover is streamed; same split allowed on request
    assert cli.main(["classify", "--run", str(quick_run), "--rank-split", "test", "--allow-same-split",
                     "--max-rank-images", "30", "--max-eval-images", "30", "--batch-size", "32"]) == 0
    manifest = read_json(quick_run / "classify" / "manifest.json")
    assert manifest["rank_source"].startswith("stream") and manifest["rank_images"] == 30


def test_counts_from_cache_equal_a_streaming_pass(quick_run):
    from patchsae.activations.cache import ActivationCache
    from patchsae.runs.artefacts import open_run

    _, model, sae, _ = open_run(Run(quick_run))
    ds = FirstN(FashionMNIST("train"), 40)
    streamed, n = counts.counts_from_stream(model, sae, ds, -2, 0.2, 40, 16, False)
    cached, m = counts.counts_from_cache(ActivationCache(quick_run / "cache" / "train"), sae, 10, 0.2, 40)
    assert n == m == 40 and streamed.sum() > 0
    # the cache is fp16: allow the rare token that sits right at tau
    assert (streamed - cached).abs().sum() <= 0.01 * streamed.sum()


# ---- the reference protocol (issue 13) -------------------------------------------------------------------------

def test_text_head_not_renormalised_is_the_plain_mean_of_normalised_prompts(tiny, tmp_path):
    classes, templates = ["cat", "ankle boot", "7"], ["a photo of a {}.", "{}", "a blurry photo of the {}."]
    head = tiny.text_head(classes, templates, renormalise=False)
    want = []
    for c in classes:  # one prompt at a time, normalised in numpy: independent of the batched path
        embs = [tiny.text_features([t.format(c)])[0].double().numpy() for t in templates]
        want.append(sum(e / (e ** 2).sum() ** 0.5 for e in embs) / len(embs))
    torch.testing.assert_close(head.double(), torch.from_numpy(np.stack(want)), rtol=1e-5, atol=1e-6)
    assert (head.norm(dim=-1) < 1 - 1e-4).all()  # templates disagree, so the mean is shorter than unit
    torch.testing.assert_close(tiny.text_head(classes, templates), torch.nn.functional.normalize(head, dim=-1))
    # the cache keys the choice: each protocol gets its own head back
    path = tmp_path / "head.safetensors"
    plain = cached_text_head(tiny, classes, path, renormalise=False)
    unit = cached_text_head(tiny, classes, path)
    assert (plain.norm(dim=-1) < 1 - 1e-4).all() and torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_splice_shift_moves_every_spliced_token_and_nothing_else(tiny, monkeypatch):
    """Every residual the grid finishes, with shift s against shift 0: the spliced rows differ by exactly s at
    every coordinate of every token; original and error_kept do not move."""
    model, sae, s = tiny, _random_sae(), 0.37
    ds = FirstN(FashionMNIST("test"), 12)
    head_CE, counts_CS = model.text_head(ds.class_names), torch.randint(0, 30, (10, 64))
    seen: dict[float, list] = {}
    real = model.finisher

    def recording(shift):
        def finisher(layer, sample):
            finish, fast = real(layer, sample)
            return (lambda r: seen[shift].append(r.clone()) or finish(r)), fast
        return finisher

    for shift in (0.0, s):
        seen[shift] = []
        monkeypatch.setattr(model, "finisher", recording(shift))
        grid.classify_grid(model, sae, ds, -2, head_CE, counts_CS, (1, 5, None), (0,), None, 12, False, shift)
    assert len(seen[0.0]) == len(seen[s]) == 3 + 3 * 2 * 3  # baselines + 3 rankings x on/off x 3 ks
    for i, (a, b) in enumerate(zip(seen[0.0], seen[s])):
        if i in (0, 2):  # original, error_kept
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(b - a, torch.full_like(a, s), rtol=0, atol=1e-5)


def test_mean_error_against_a_dense_computation(tiny):
    sae = _random_sae()
    ds = FirstN(FashionMNIST("train"), 10)
    got, n = grid.mean_error(tiny, sae, ds, -2, None, 4, False)
    pixels, _, _ = next(iter_batches(ds, tiny.preprocess, 10))
    x = tiny.block_output(pixels, -2).double()
    with torch.no_grad():
        want = (x - sae.decode(sae.encode(x.float())).double()).mean().item()
    assert n == 10 and got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_cli_classify_reference_protocol(quick_run, capsys):
    capsys.readouterr()
    assert cli.main(["classify", "--run", str(quick_run), "--protocol", "reference", "--splice-shift", "abc"]) == 2
    err = capsys.readouterr().err
    assert "--splice-shift must be a number or mean-error, not 'abc'" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["classify", "--run", str(quick_run), "--protocol", "reference", "--rank-split", "train",
                     "--eval-split", "test"]) == 2
    assert "ranks and evaluates on one split" in capsys.readouterr().err
    assert cli.main(["classify", "--run", str(quick_run), "--protocol", "reference", "--max-rank-images", "40",
                     "--max-eval-images", "40", "--batch-size", "40"]) == 0
    assert "text head not re-normalised, splice shift 0.105131" in capsys.readouterr().out
    m = read_json(quick_run / "classify" / "manifest.json")
    assert (m["protocol"], m["rank_split"], m["eval_split"], m["text_head_renormalised"]) == (
        "reference", "train", "train", False)
    assert m["splice_shift"]["value"] == 0.105131256516992
    assert cli.main(["classify", "--run", str(quick_run), "--protocol", "reference", "--splice-shift", "mean-error",
                     "--max-rank-images", "40", "--max-eval-images", "40", "--batch-size", "40"]) == 0
    m = read_json(quick_run / "classify" / "manifest.json")
    from patchsae.runs.artefacts import open_run
    _, model, sae, _ = open_run(Run(quick_run))
    want, _ = grid.mean_error(model, sae, FashionMNIST("train"), -2, 40, 40, False)
    assert m["splice_shift"]["images"] == 40 and m["splice_shift"]["value"] == pytest.approx(want)


def test_a_constant_splice_shift_cannot_change_a_prediction(tiny):
    """Every block reads the residual stream through a LayerNorm, and so does the head (ln_post), which subtracts
    each token's mean over dimensions: adding one constant to every coordinate of a token changes nothing
    downstream. So the reference's SAE_BIAS shift is a no-op for Fig 5b (docs/method.md)."""
    ds = FirstN(FashionMNIST("test"), 8)
    pixels, _, _ = next(iter_batches(ds, tiny.preprocess, 8))
    h_BTD = tiny.block_output(pixels, -2)
    base = tiny.finish_from(h_BTD, -2)
    for c in (0.105131256516992, -3.0):
        torch.testing.assert_close(tiny.finish_from(h_BTD + c, -2), base, rtol=1e-4, atol=1e-4)
