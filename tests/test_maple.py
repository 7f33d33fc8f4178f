"""MaPLe: the prompted towers against independent forwards, prompt depth and token counts, frozen CLIP weights,
save/load round trips, the official checkpoint layout (ViT-B/16 widths, random values), the improvement rate,
the concept groups on hand-made counts, and the adapt / compare commands end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_clip
from patchsae import PatchSAEError, cli
from patchsae.adaptation.prompts import improvement_rate, train_prompts
from patchsae.analysis.groups import group_table, latent_groups, pearson
from patchsae.stages.adapt import AdaptOptions
from patchsae.models.load import load_model
from patchsae.models.maple import (MapleConfig, build_maple, default_depth, load_adapted, load_official_checkpoint,
                                   save_prompts)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Vision width 32, 3 blocks, 7x7 patches; text width 32, 3 blocks (so J can reach 3); byte tokenizer."""
    return load_model(str(make_clip(tmp_path_factory.mktemp("maple_clip"), text_layers=3)))


def _pixels(n=3, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=1):
    """Prompts far from their initial values, so that every path of the forward matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# ---- forward consistency ------------------------------------------------------------------------------------

def test_depth_one_text_equals_the_plain_prompt(clip):
    """At initialisation the context holds the token embeddings of the init phrase's first tokens, so with no
    deeper prompts the text tower computes exactly CLIP's embedding of "a photo of a <name>."."""
    maple = build_maple(clip, MapleConfig(depth=1))
    names = ["t-shirt", "ankle boot", "seven"]
    want = clip.text_features([f"a photo of a {n}." for n in names])
    torch.testing.assert_close(maple.text_features(names), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maple.text_head(names), F.normalize(want, dim=-1), rtol=1e-5, atol=1e-5)


def _reference_image_features(clip, prompts, pixels):
    """The official VisionTransformer_MaPLe forward, written out independently: prompts appended AFTER the
    patches (the official order), no positional embedding on them, the last n_ctx rows overwritten before
    blocks 1..J-1."""
    v = clip.hf.vision_model
    n, J = prompts.n_ctx, prompts.depth
    with torch.no_grad():
        h = v.embeddings(pixels)
        h = torch.cat([h, (prompts.ctx @ prompts.proj.weight.T + prompts.proj.bias).expand(len(h), -1, -1)], 1)
        h = v.pre_layrnorm(h)
        for i, block in enumerate(v.encoder.layers):
            if 1 <= i < J:
                lin = prompts.compound_prompt_projections[i - 1]
                deep = prompts.compound_prompts_text[i - 1] @ lin.weight.T + lin.bias
                h = torch.cat([h[:, :-n], deep.expand(len(h), -1, -1)], 1)
            h = block(h, None)
        return clip.hf.visual_projection(v.post_layernorm(h[:, 0]))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_vision_tower_matches_the_official_token_order(clip, depth):
    maple = build_maple(clip, MapleConfig(depth=depth))
    _randomise(maple)
    x = _pixels()
    torch.testing.assert_close(maple.image_features(x), _reference_image_features(clip, maple.prompts, x),
                               rtol=1e-4, atol=1e-5)


def test_block_output_finish_and_splice_agree(clip):
    maple = build_maple(clip, MapleConfig(depth=3))
    _randomise(maple)
    x = _pixels()
    full = maple.image_features(x)
    for layer in (0, 1, -2):
        h = maple.block_output(x, layer)
        torch.testing.assert_close(maple.finish_from(h, layer), full, rtol=1e-5, atol=1e-6)
    with maple.replace_block_output(-2, lambda h: h):
        torch.testing.assert_close(maple.image_features(x), full, rtol=1e-5, atol=1e-6)
    with maple.replace_block_output(-2, lambda h: torch.zeros_like(h)):
        assert not torch.allclose(maple.image_features(x), full)


def test_the_frozen_clip_is_untouched_by_building_and_running(clip):
    x = _pixels()
    before = clip.image_features(x)
    maple = build_maple(clip)
    _randomise(maple)
    assert not torch.allclose(maple.image_features(x), before)
    torch.testing.assert_close(clip.image_features(x), before, rtol=0, atol=0)
    assert clip.layout().n_prompt == 0


class _TinyImages:
    """Six random 28 px images in two classes."""

    name, split, class_names = "tiny", "test", ("a", "b")

    def __len__(self):
        return 6

    def load(self, i):
        from PIL import Image

        g = torch.Generator().manual_seed(i)
        return Image.fromarray((torch.rand(28, 28, generator=g) * 255).byte().numpy(), mode="L"), i % 2


def test_existing_analysis_runs_on_the_adapted_model(clip):
    """Patch maps, class-level counts and SAE splicing take the adapted model as it is and see only its image
    tokens (CLS + patches), never the visual prompt rows."""
    from patchsae.analysis.latents import collect_stats
    from patchsae.analysis.codes import spliced
    from patchsae.analysis.patch_maps import image_activations, patch_grid
    from patchsae.data.base import iter_batches
    from patchsae.sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    maple = build_maple(clip, MapleConfig(depth=2))
    _randomise(maple)
    sae = SAE(SAEConfig(d_model=32, d_sae=64, arch="topk", k=8)).eval()
    x = _pixels(1)
    h_TD = maple.block_output(x, -2)[0]
    image_rows = torch.cat([h_TD[:1], h_TD[3:]])  # CLS, then the 49 patches; rows 1-2 are the prompts
    with torch.no_grad():
        want_TS = sae.encode(image_rows)
    f_TS = image_activations(maple, sae, x[0], -2)
    torch.testing.assert_close(f_TS, want_TS)
    latent = int(want_TS[1:].sum(0).argmax())
    torch.testing.assert_close(patch_grid(f_TS, maple.layout(), latent), want_TS[1:, latent].reshape(7, 7))

    ds = _TinyImages()
    stats = collect_stats(maple, sae, ds, -2, batch_size=4, progress=False)
    counts = torch.zeros(2, 64, dtype=torch.long)
    for pixels, labels, _ in iter_batches(ds, maple.preprocess, 6):
        h = maple.block_output(pixels, -2)
        with torch.no_grad():
            f = sae.encode(torch.cat([h[:, :1], h[:, 3:]], 1))
        counts.index_add_(0, labels, (f > 0.2).sum(1))
    assert torch.equal(stats.class_counts_CS, counts)

    with torch.no_grad():
        h = maple.block_output(x, -2)
        resid = h.clone()
        resid[:, [0, *range(3, 52)]] = sae.decode(sae.encode(resid[:, [0, *range(3, 52)]]))
        want = maple.finish_from(resid, -2)
    with spliced(maple, sae, -2):
        torch.testing.assert_close(maple.image_features(x), want, rtol=1e-5, atol=1e-6)
    # depth 2 prompts blocks 0 and 1 only; after the hooked block 1 the tower is plain CLIP, so the masking grid
    # may run its last block for the CLS query only
    finish, fast = maple.finisher(-2, h)
    assert fast and maple.plain_blocks_start() == 2 and maple.fast_finisher(-3) is None
    torch.testing.assert_close(finish(h), maple.finish_from(h, -2), rtol=1e-4, atol=1e-5)


# ---- depth and token counts ---------------------------------------------------------------------------------

def test_default_depth_rule():
    assert default_depth(12, 12) == 9  # ViT-B/16: the paper's J
    assert default_depth(6, 4) == 4  # the embedded model: round(4.5) = 5, capped by its 4 text blocks
    assert default_depth(6, 6) == 5
    assert default_depth(24, 12) == 12
    assert default_depth(1, 1) == 1


@pytest.mark.parametrize("n_ctx,depth", [(2, 2), (3, 3), (1, 1)])
def test_prompt_depth_and_token_counts(clip, n_ctx, depth):
    maple = build_maple(clip, MapleConfig(n_ctx=n_ctx, depth=depth))
    lay = maple.layout()
    assert (lay.n_cls, lay.n_prompt, lay.n_patches) == (1, n_ctx, 49)
    assert lay.kinds()[1: 1 + n_ctx] == ["prompt"] * n_ctx
    assert int(lay.image_token_mask().sum()) == 50
    assert maple.block_output(_pixels(2), -1).shape == (2, 50 + n_ctx, 32)
    assert len(maple.prompts.compound_prompts_text) == depth - 1
    assert len(maple.prompts.compound_prompt_projections) == depth - 1
    assert maple.prompts.ctx.shape == (n_ctx, 32)
    n_params = sum(p.numel() for p in maple.prompts.parameters())
    assert n_params == depth * (n_ctx * 32 + 32 * 32 + 32)


def test_the_prompt_of_block_i_reaches_blocks_i_and_above_only(clip):
    """Changing the deep prompt of block 2 changes the residual stream after blocks 2.. but not after 0 and 1;
    the prompt rows entering block 1 are the block's own prompt, not what block 0 made of the first one."""
    maple = build_maple(clip, MapleConfig(depth=3))
    _randomise(maple)
    x = _pixels(2)
    before = [maple.block_output(x, i) for i in range(3)]
    with torch.no_grad():
        maple.prompts.compound_prompts_text[1].add_(1.0)  # the prompt of block 2
    after = [maple.block_output(x, i) for i in range(3)]
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    assert not torch.allclose(after[2], before[2])


def test_depth_beyond_the_towers_is_refused(clip):
    with pytest.raises(PatchSAEError, match="exceeds"):
        build_maple(clip, MapleConfig(depth=4))  # both towers have 3 blocks
    with pytest.raises(PatchSAEError, match="fewer than n_ctx"):
        build_maple(clip, MapleConfig(n_ctx=40))


# ---- training -----------------------------------------------------------------------------------------------

def test_training_moves_the_prompts_and_leaves_clip_bit_identical(clip):
    frozen = {k: v.clone() for k, v in clip.hf.state_dict().items()}
    maple = build_maple(clip, MapleConfig(depth=2), seed=3)
    start = {k: v.clone() for k, v in maple.prompts.state_dict().items()}
    x, y = _pixels(8, seed=1), torch.arange(8) % 4
    log = train_prompts(maple, x, y, ["a", "b", "c", "d"],
                        AdaptOptions(optimizer="adamw", lr=1e-2, epochs=3, batch_size=4, warmup_epochs=0).recipe(),
                        progress=False)
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    for k, v in clip.hf.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(not p.requires_grad for p in clip.hf.parameters())
    moved = [k for k, v in maple.prompts.state_dict().items() if not torch.equal(v, start[k])]
    assert sorted(moved) == sorted(start)  # every prompt tensor learnt something


def test_improvement_rate():
    assert improvement_rate(73.07, 42.61) == pytest.approx(53.08, abs=0.01)  # the paper's EuroSAT row
    assert improvement_rate(56.16, 53.45) == pytest.approx(5.82, abs=0.01)  # StanfordCars
    assert improvement_rate(60.0, 60.0) == 0.0
    assert improvement_rate(40.0, 60.0) == pytest.approx(-50.0)
    assert improvement_rate(100.0, 100.0) == 0.0


# ---- saving and loading -------------------------------------------------------------------------------------

def test_save_load_round_trip(clip, tmp_path):
    maple = build_maple(clip, MapleConfig(depth=2))
    _randomise(maple)
    save_prompts(tmp_path / "p", maple, {"dataset": "x"})
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["n_ctx"], cfg["depth"], cfg["model"], cfg["dataset"]) == (2, 2, clip.name, "x")
    back = load_adapted(clip, tmp_path / "p")
    x = _pixels()
    torch.testing.assert_close(back.image_features(x), maple.image_features(x), rtol=0, atol=0)
    torch.testing.assert_close(back.text_head(["a", "b"]), maple.text_head(["a", "b"]), rtol=0, atol=0)
    same = load_adapted(clip, tmp_path / "p" / "prompts.safetensors")
    torch.testing.assert_close(same.image_features(x), maple.image_features(x), rtol=0, atol=0)


def test_prompts_of_another_model_are_refused(clip, tmp_path):
    maple = build_maple(clip, MapleConfig(depth=2))
    save_prompts(tmp_path / "p", maple)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "model": "embedded"}))
    with pytest.raises(PatchSAEError, match="trained on embedded"):
        load_adapted(clip, tmp_path / "p")
    with pytest.raises(PatchSAEError, match="no such file"):
        load_adapted(clip, tmp_path / "missing")


# ---- official checkpoints -----------------------------------------------------------------------------------

class FakeScheduler:
    """Stands for Dassl's scheduler objects pickled into official checkpoints; it must never be run."""

    ran = False

    def __init__(self):
        self.last_epoch = 4

    def __setstate__(self, state):
        FakeScheduler.ran = True


@pytest.fixture(scope="module")
def b16_clip(tmp_path_factory):
    """A CLIP with ViT-B/16's widths and depths (vision 768 x 12 blocks, text 512 x 12 blocks, 16 px patches)
    and random weights; small MLPs and a 32 px input keep it fast, and the prompt shapes only see the widths."""
    from transformers import CLIPConfig, CLIPModel

    from patchsae.models.clip import ClipModel, Preprocess
    from patchsae.models.tokenizer import build_byte_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=258, hidden_size=512, intermediate_size=64, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=256, eos_token_id=257,
                         pad_token_id=257),
        vision_config=dict(hidden_size=768, intermediate_size=64, num_hidden_layers=12, num_attention_heads=12,
                           image_size=32, patch_size=16),
        projection_dim=512)
    return ClipModel(CLIPModel(cfg).eval(), build_byte_tokenizer(), Preprocess(32), "b16-shaped", ("{}",))


def _official_state_dict(seed=0, depth=9, n_ctx=2, d_text=512, d_vision=768):
    """The keys the official trainers/maple.py saves (CustomCLIP.state_dict(): prompt_learner.*, with proj in fp16
    as the official code halves it), plus fixed token buffers and a frozen CLIP weight it also holds."""
    g = torch.Generator().manual_seed(seed)
    sd = {"prompt_learner.ctx": torch.randn(n_ctx, d_text, generator=g) * 0.02,
          "prompt_learner.proj.weight": (torch.randn(d_vision, d_text, generator=g) * 0.05).half(),
          "prompt_learner.proj.bias": (torch.randn(d_vision, generator=g) * 0.05).half(),
          "prompt_learner.token_prefix": torch.randn(10, 1, d_text, generator=g),
          "prompt_learner.token_suffix": torch.randn(10, 74, d_text, generator=g),
          "image_encoder.conv1.weight": torch.randn(d_vision, 3, 16, 16, generator=g)}
    for i in range(depth - 1):
        sd[f"prompt_learner.compound_prompts_text.{i}"] = torch.randn(n_ctx, d_text, generator=g) * 0.02
        sd[f"prompt_learner.compound_prompt_projections.{i}.weight"] = torch.randn(d_vision, d_text, generator=g) * 0.05
        sd[f"prompt_learner.compound_prompt_projections.{i}.bias"] = torch.randn(d_vision, generator=g) * 0.05
    return sd


def test_official_checkpoint_loads_into_b16(b16_clip, tmp_path):
    sd = _official_state_dict()
    path = tmp_path / "MultiModalPromptLearner" / "model.pth.tar-5"
    path.parent.mkdir()
    torch.save({"state_dict": sd, "epoch": 5, "optimizer": {"state": {}, "param_groups": [{"lr": 0.0035}]},
                "scheduler": FakeScheduler(), "val_result": None}, path)
    FakeScheduler.ran = False
    tensors = load_official_checkpoint(path)
    assert not FakeScheduler.ran
    assert "token_prefix" not in tensors and "token_suffix" not in tensors
    assert not any(k.startswith("image_encoder") for k in tensors)

    maple = load_adapted(b16_clip, path)
    assert (maple.prompts.n_ctx, maple.depth) == (2, 9)
    assert maple.layout().n_tokens == 1 + 2 + 4
    p = maple.prompts
    torch.testing.assert_close(p.ctx.data, sd["prompt_learner.ctx"], rtol=0, atol=0)
    assert p.proj.weight.dtype == torch.float32
    w0, b0 = sd["prompt_learner.proj.weight"].float(), sd["prompt_learner.proj.bias"].float()
    want0 = sd["prompt_learner.ctx"] @ w0.T + b0
    torch.testing.assert_close(p.vision_prompt(0), want0, rtol=1e-5, atol=1e-5)
    for i in range(1, 9):
        w = sd[f"prompt_learner.compound_prompt_projections.{i - 1}.weight"]
        b = sd[f"prompt_learner.compound_prompt_projections.{i - 1}.bias"]
        t = sd[f"prompt_learner.compound_prompts_text.{i - 1}"]
        torch.testing.assert_close(p.text_prompt(i), t, rtol=0, atol=0)
        torch.testing.assert_close(p.vision_prompt(i), t @ w.T + b, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(maple.image_features(x), _reference_image_features(b16_clip, p, x),
                               rtol=1e-4, atol=1e-4)
    assert maple.text_head(["cat", "dog"]).shape == (2, 512)


def test_official_checkpoint_errors(b16_clip, clip, tmp_path):
    sd = _official_state_dict()
    path = tmp_path / "model.pth.tar-2"
    torch.save({"state_dict": sd, "epoch": 2}, path)
    with pytest.raises(PatchSAEError, match="text width 512 and vision width 768"):
        load_adapted(clip, path)  # the tiny model is not ViT-B/16
    bad = dict(sd)
    del bad["prompt_learner.compound_prompt_projections.3.bias"]
    torch.save({"state_dict": bad}, path)
    with pytest.raises(PatchSAEError, match="missing"):
        load_adapted(b16_clip, path)
    torch.save({"state_dict": {"image_encoder.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(PatchSAEError, match="not a MaPLe checkpoint"):
        load_adapted(b16_clip, path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PatchSAEError, match="not a readable PyTorch checkpoint"):
        load_adapted(b16_clip, path)


# ---- concept groups -----------------------------------------------------------------------------------------

def test_groups_on_hand_made_counts():
    """Two classes, eight latents, high = top-2 (and counted), low = rank >= 4 or never counted."""
    clip_CS = torch.tensor([[10, 9, 8, 7, 6, 5, 0, 0],
                            [0, 0, 0, 0, 1, 2, 3, 4]])
    maple_CS = torch.tensor([[9, 0, 10, 1, 2, 3, 8, 0],   # ranks: 0->1, 2->0, 6->2 (rank 2: not high, not low)
                             [0, 0, 0, 0, 1, 2, 3, 4]])   # identical to CLIP
    g = latent_groups(clip_CS, maple_CS, top_n=2, low_rank=4)
    # class 0: CLIP high {0, 1}; MaPLe high {2, 0}; MaPLe ranks: 2,0,6,5,4,3,1,7 -> low = rank >= 4: {4, 3, 1, 7}
    assert g["high"][0].nonzero().flatten().tolist() == [0]
    assert g["high_to_low"][0].nonzero().flatten().tolist() == [1]
    # latent 2: CLIP rank 2 (not high, not low) -> MaPLe high: shifted, not introduced
    assert g["low_to_high"][0].nonzero().flatten().tolist() == []
    assert g["shifted"][0].nonzero().flatten().tolist() == [2]
    # class 1: the same counts in both models -> its top-2 are re-used, nothing moves
    assert g["high"][1].nonzero().flatten().tolist() == [6, 7]
    assert not g["high_to_low"][1].any() and not g["low_to_high"][1].any()
    table = group_table(g, base=[0], novel=[1])
    assert table["high"] == {"base": 1.0, "novel": 2.0}
    assert table["high_to_low"] == {"base": 1.0, "novel": 0.0}


def test_groups_introduced_latent_and_pure_top_n_rule():
    clip_CS = torch.tensor([[5, 4, 3, 2, 1, 0]])
    maple_CS = torch.tensor([[5, 0, 0, 0, 0, 9]])  # latent 5 never fired under CLIP and is now first
    g = latent_groups(clip_CS, maple_CS, top_n=2)  # low_rank defaults to 4
    assert g["low_to_high"][0].nonzero().flatten().tolist() == [5]
    assert g["high"][0].nonzero().flatten().tolist() == [0]
    assert g["high_to_low"][0].nonzero().flatten().tolist() == [1]  # count 0 under MaPLe
    pure = latent_groups(clip_CS, maple_CS, top_n=2, low_rank=2)
    assert int(pure["high_to_low"].sum()) == int(pure["low_to_high"].sum())  # why low_rank > top_n by default
    with pytest.raises(PatchSAEError):
        latent_groups(clip_CS, maple_CS, top_n=3, low_rank=2)
    assert pearson(torch.tensor([1, 2, 3]), torch.tensor([2, 4, 6])) == pytest.approx(1.0)


# ---- the commands -------------------------------------------------------------------------------------------

def test_adapt_and_compare_commands(make_tiny_run, tiny_clip_dir, tmp_path, capsys):
    run = make_tiny_run("maple")
    out = tmp_path / "prompts"
    rc = cli.main(["adapt", "--model", str(tiny_clip_dir), "--dataset", "fashion-mnist", "--shots", "2",
                   "--epochs", "1", "--batch-size", "5", "--max-eval-images", "20", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["base_classes"] == [0, 1, 2, 3, 4] and cfg["novel_classes"] == [5, 6, 7, 8, 9]
    assert len(cfg["few_shot_indices"]) == 10
    base = cfg["accuracy"]["base"]
    assert base["images"] == 20
    assert base["delta"] == pytest.approx(improvement_rate(base["adapted"], base["zero_shot"]))
    assert f"{base['zero_shot']:.2f}%" in printed

    rc = cli.main(["compare", "--run", str(run), "--adapted", str(out), "--max-images", "30",
                   "--max-rank-images", "30", "--max-eval-images", "20", "--top-n", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((run / "compare" / "prompts" / "summary.json").read_text())
    assert summary["images"] == 30 and summary["rank_images"] == 30
    assert summary["rule"] == {"tau": 0.2, "top_n": 5, "low_rank": 10}
    for g in ("high", "high_to_low", "low_to_high"):
        assert 0 <= summary["groups"][g]["base"] <= 5
    assert sorted({(r["ranking"], r["classifier"]) for r in summary["masking"] if r["ranking"]}) == [
        ("clip", "clip"), ("clip", "maple"), ("maple", "clip"), ("maple", "maple")]
    assert "correlation of dataset-level counts" in printed
    for name in ("counts.safetensors", "groups.csv", "masking.csv", "masking.png"):
        assert (run / "compare" / "prompts" / name).is_file(), name
    assert len(list((run / "compare" / "prompts").glob("scatter_*.png"))) == 2
    assert not list(run.rglob("*.tmp"))


def test_adapt_bad_class_is_one_line_error(tiny_clip_dir, tmp_path, capsys):
    rc = cli.main(["adapt", "--model", str(tiny_clip_dir), "--dataset", "fashion-mnist", "--base-classes", "llama",
                   "--out", str(tmp_path / "p")])
    assert rc == 2
    assert "unknown class 'llama'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


# ---- the digits dataset, class subsets, few-shot draws ------------------------------------------------------

def test_digits_dataset_and_subsets():
    import numpy as np
    from sklearn.datasets import load_digits

    from patchsae.data import open_dataset
    from patchsae.data.subsets import ClassSubset, dataset_labels, few_shot_indices

    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    assert (len(train), len(test)) == (1000, 797)
    assert train.class_names[7] == "seven"
    ref = load_digits()
    img, label = test.load(5)
    assert img.size == (8, 8) and img.mode == "L" and label == int(ref.target[1005])
    assert np.array_equal(np.asarray(img), np.round(ref.images[1005] * 255 / 16).astype(np.uint8))
    sub = ClassSubset(test, [7, 2])
    labels = dataset_labels(test)
    assert len(sub) == int(((labels == 7) | (labels == 2)).sum()) and sub.class_names == ("seven", "two")
    first = sub.index_of(0)
    assert sub.load(0)[1] == (0 if labels[first] == 7 else 1)
    shots = few_shot_indices(dataset_labels(train), [0, 1], 3, seed=4)
    assert len(shots) == 6 and sorted(dataset_labels(train)[shots].tolist()) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(shots, few_shot_indices(dataset_labels(train), [0, 1], 3, seed=4))
    assert not np.array_equal(shots, few_shot_indices(dataset_labels(train), [0, 1], 3, seed=5))
    with pytest.raises(PatchSAEError, match="fewer than --shots"):
        few_shot_indices(dataset_labels(train), [0], 500, seed=0)
    with pytest.raises(PatchSAEError, match="splits"):
        open_dataset("digits", "validation")
