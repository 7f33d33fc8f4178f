"""The CLIP interface (the backbone interface as CLIP implements it): hook equivalence with Hugging Face's own
forward, splicing, preprocessing, text head, tokenizer, loading errors, prompt templates, the checked fast
finisher and the frozen-weights fingerprint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from conftest import make_clip
from patchsae import PatchSAEError
from patchsae.models.backbone import Backbone
from patchsae.models.clip import ClipModel, Preprocess
from patchsae.models.load import load_model
from patchsae.models.templates import IMAGENET_TEMPLATES
from patchsae.models.tokenizer import build_byte_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- ViT-B/16 configuration, random weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """Full-size ViT-B/16 vision tower (random weights) behind a tiny text tower, loaded through load_model,
    plus HF's own outputs for one batch of 2 images (computed once: a B/16 forward is slow on 2 cores)."""
    folder = make_clip(tmp_path_factory.mktemp("b16"), width=768, layers=12, heads=12, image_size=224, patch=16,
                       text_width=96, text_layers=2, proj=512, seed=1)
    model = load_model(str(folder))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    with torch.no_grad():
        out = model.hf.get_image_features(pixel_values=x, output_hidden_states=True)
    return model, x, out.hidden_states, out.pooler_output


def test_b16_shapes(b16):
    model, x, hidden, _ = b16
    assert model.n_layers == 12 and model.d_model == 768
    layout = model.layout()
    assert layout.grid == (14, 14) and layout.n_tokens == 197
    assert len(hidden) == 13  # embeddings + 12 blocks


@pytest.mark.parametrize("layer", [-2, 3])
def test_b16_block_output_early_exit_matches_hf_hidden_state(b16, layer):
    model, x, hidden, _ = b16
    L = model.resolve_layer(layer)
    calls = []
    above = model.blocks[L + 1].register_forward_hook(lambda *_: calls.append(1))
    try:
        h = model.block_output(x, layer)
    finally:
        above.remove()
    assert calls == [], "early exit must not run the blocks above the hooked one"
    assert h.shape == (2, 197, 768)
    assert (h - hidden[L + 1]).abs().max().item() <= 1e-5
    # and it is not trivially equal to a neighbouring hidden state
    assert (h - hidden[L]).abs().max().item() > 1e-3


def test_b16_hooked_activation_inside_full_forward_matches_hf(b16):
    """Without early exit: the activation seen by replace_block_output during a full forward."""
    model, x, hidden, pooled = b16
    seen = {}

    def recorder(name):
        def fn(h):
            seen[name] = h.clone()
            return h
        return fn

    with model.replace_block_output(-2, recorder(-2)), model.replace_block_output(3, recorder(3)):
        feats = model.image_features(x)
    assert feats.shape == (2, 512)
    assert seen[-2].shape == (2, 197, 768)
    assert (seen[-2] - hidden[11]).abs().max().item() <= 1e-5
    assert (seen[3] - hidden[4]).abs().max().item() <= 1e-5
    # an identity hook leaves the output unchanged
    assert (feats - pooled).abs().max().item() <= 1e-5


def test_b16_finish_from_matches_hf(b16):
    model, x, hidden, pooled = b16
    # (image_features itself is compared with HF in the hooked-forward test above, with identity hooks)
    # finish from HF's own hidden state after block 10 (index -2)
    resumed = model.finish_from(hidden[11], -2)
    assert (resumed - pooled).abs().max().item() <= 1e-5


# ---- tiny model --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("layer", [0, 1, -1, -3])
def test_finish_from_block_output_equals_image_features(tiny, pixels, layer):
    full = tiny.image_features(pixels)
    resumed = tiny.finish_from(tiny.block_output(pixels, layer), layer)
    assert torch.allclose(resumed, full, atol=1e-5, rtol=0)


def test_models_load_with_sdpa_attention_equal_to_eager(tiny_clip_dir, tiny, pixels):
    """Both loaders ask transformers for PyTorch's SDPA attention; it computes the eager attention's
    activations (to float rounding)."""
    from transformers import CLIPModel

    from patchsae.models.openai_format import load_openai_checkpoint

    assert tiny.hf.config._attn_implementation == "sdpa"
    assert tiny.hf.vision_model.config._attn_implementation == "sdpa"
    eager = ClipModel(CLIPModel.from_pretrained(str(tiny_clip_dir), attn_implementation="eager").eval(),
                      tiny.tokenizer, tiny.preprocess, "eager", tiny.templates)
    with torch.no_grad():
        torch.testing.assert_close(tiny.block_output(pixels, -2), eager.block_output(pixels, -2), atol=1e-5,
                                   rtol=1e-5)
    from safetensors.torch import save_file
    from test_openai_format import SMALL, random_openai_sd  # the OpenAI layout at a small size

    path = tiny_clip_dir.parent / "openai_sdpa.safetensors"
    save_file(random_openai_sd(**SMALL), str(path))
    assert load_openai_checkpoint(path)[0].config._attn_implementation == "sdpa"


def test_tiny_matches_hf(tiny, pixels):
    with torch.no_grad():
        out = tiny.hf.get_image_features(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(tiny.image_features(pixels), out.pooler_output, atol=1e-5, rtol=0)
    for L in range(tiny.n_layers):
        assert torch.allclose(tiny.block_output(pixels, L), out.hidden_states[L + 1], atol=1e-5, rtol=0)


def test_replace_block_output_zeros_changes_embedding_as_predicted(tiny, pixels):
    base = tiny.image_features(pixels)
    with tiny.replace_block_output(-2, torch.zeros_like):
        zeroed = tiny.image_features(pixels)
    h = tiny.block_output(pixels, -2)
    expected = tiny.finish_from(torch.zeros_like(h), -2)
    assert not torch.allclose(zeroed, base, atol=1e-3)
    assert torch.allclose(zeroed, expected, atol=1e-5, rtol=0)
    # hook removed: a normal forward is unchanged
    assert torch.equal(tiny.image_features(pixels), base)


def test_replace_block_output_only_affects_hooked_block(tiny, pixels):
    L = 0
    delta = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(9))
    with tiny.replace_block_output(L, lambda h: h + delta):
        spliced = tiny.image_features(pixels)
        # block outputs below and at the hook are read after the replacement applies at L only
    expected = tiny.finish_from(tiny.block_output(pixels, L) + delta, L)
    assert torch.allclose(spliced, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(spliced, tiny.image_features(pixels), atol=1e-3)


def test_replace_block_output_removed_after_exception(tiny, pixels):
    base = tiny.image_features(pixels)
    hooks_before = [list(b._forward_hooks) for b in tiny.blocks]  # HF installs capture hooks of its own
    with pytest.raises(RuntimeError, match="boom"):
        with tiny.replace_block_output(-2, torch.zeros_like):
            raise RuntimeError("boom")
    assert torch.equal(tiny.image_features(pixels), base)
    assert [list(b._forward_hooks) for b in tiny.blocks] == hooks_before


def test_resolve_layer(tiny):
    n = tiny.n_layers
    assert tiny.resolve_layer(-2) == n - 2
    assert tiny.resolve_layer(-1) == n - 1
    assert tiny.resolve_layer(-n) == 0
    assert tiny.resolve_layer(0) == 0
    assert tiny.resolve_layer(n - 1) == n - 1
    for bad in (n, n + 5, -n - 1):
        with pytest.raises(PatchSAEError) as info:
            tiny.resolve_layer(bad)
        msg = str(info.value)
        assert str(bad) in msg and str(-n) in msg and str(n - 1) in msg
    with pytest.raises(PatchSAEError):
        tiny.block_output(torch.zeros(1, 3, 28, 28), n)
    with pytest.raises(PatchSAEError):
        with tiny.replace_block_output(n, lambda h: h):
            pass


# ---- preprocessing -------------------------------------------------------------------------------------------
MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)


def _expected(arr_HWC_uint8):
    arr = arr_HWC_uint8.astype(np.float32) / 255.0
    return torch.from_numpy((arr - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).permute(2, 0, 1)


@pytest.mark.parametrize("size_wh", [(40, 30), (30, 40), (28, 28), (100, 57)])
def test_preprocess_constant_colour(size_wh):
    pre = Preprocess(28, MEAN, STD)
    rgb = (10, 100, 200)
    out = pre.image(Image.new("RGB", size_wh, rgb))
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    for c in range(3):
        want = (rgb[c] / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[c], torch.full((28, 28), want), atol=1e-5)


def test_preprocess_centre_crop_without_resize():
    """Shortest side already equals the size: no resampling, the centre crop is exact."""
    pre = Preprocess(28, MEAN, STD)
    # wide image: every column has its own colour
    cols = np.arange(40, dtype=np.uint8) * 5
    wide = np.stack([np.tile(cols, (28, 1)), np.tile(255 - cols, (28, 1)), np.full((28, 40), 7, np.uint8)], -1)
    out = pre.image(Image.fromarray(wide, "RGB"))
    assert torch.allclose(out, _expected(wide[:, 6:34]), atol=1e-6)
    # tall image: every row has its own colour
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 40 rows x 28 cols
    out = pre.image(Image.fromarray(tall, "RGB"))
    assert torch.allclose(out, _expected(tall[6:34]), atol=1e-6)


def test_preprocess_non_square_resizes_shortest_side_and_crops_centre():
    pre = Preprocess(28, MEAN, STD)
    # 80x40: left half red, right half blue -> resized to 56x28 -> centre crop = resized columns 14..41:
    # the left half of the crop is red, the right half blue (away from the blurred border).
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:] = (0, 0, 255)
    out = pre.image(Image.fromarray(arr, "RGB"))
    assert out.shape == (3, 28, 28)
    red = _expected(np.array([[[255, 0, 0]]], np.uint8))[:, 0, 0]
    blue = _expected(np.array([[[0, 0, 255]]], np.uint8))[:, 0, 0]
    assert torch.allclose(out[:, :, :10], red[:, None, None].expand(3, 28, 10), atol=0.05)
    assert torch.allclose(out[:, :, 18:], blue[:, None, None].expand(3, 28, 10), atol=0.05)
    # a 40x30 image with known values keeps the crop square and finite
    rng = np.random.default_rng(0)
    out = pre.image(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB"))
    assert out.shape == (3, 28, 28) and torch.isfinite(out).all()


def test_preprocess_grayscale_becomes_three_channels():
    pre = Preprocess(28, MEAN, STD)
    g = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    out = pre.image(Image.fromarray(g.astype(np.uint8), "L"))
    assert out.shape == (3, 28, 28)
    rgb = np.repeat(g.astype(np.uint8)[..., None], 3, -1)
    assert torch.allclose(out, _expected(rgb), atol=1e-6)
    batch = pre([Image.fromarray(g.astype(np.uint8), "L"), Image.new("RGBA", (28, 28), (1, 2, 3, 4))])
    assert batch.shape == (2, 3, 28, 28)


def test_loaded_preprocess_uses_folder_config(tiny):
    assert tiny.preprocess.size == 28
    assert tiny.preprocess.mean == (0.5, 0.5, 0.5) and tiny.preprocess.std == (0.25, 0.25, 0.25)


# ---- text -----------------------------------------------------------------------------------------------------
def test_text_head_hand_computation(tiny):
    classes = ["cat", "t-shirt", "ankle boot", "7"]
    templates = ["a photo of a {}.", "{}", "a blurry photo of the {} in the dark."]
    head = tiny.text_head(classes, templates)
    proj = tiny.hf.config.projection_dim
    assert head.shape == (len(classes), proj)
    assert torch.allclose(head.norm(dim=-1), torch.ones(len(classes)), atol=1e-5)
    rows = []
    for c in classes:
        # one prompt at a time: no padding involved, independent of the batched path
        embs = [F.normalize(tiny.text_features([t.format(c)])[0], dim=0) for t in templates]
        rows.append(F.normalize(torch.stack(embs).mean(0), dim=0))
    assert torch.allclose(head, torch.stack(rows), atol=1e-5)


def test_text_features_batched_equals_single(tiny):
    prompts = ["a", "a photo of a very long class name with many words", "dress"]
    batched = tiny.text_features(prompts)
    single = torch.cat([tiny.text_features([p]) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-5)
    small_batches = tiny.text_features(prompts, batch_size=2)
    assert torch.allclose(batched, small_batches, atol=1e-5)


def test_tokenizer_eos_is_largest_id():
    tok = build_byte_tokenizer()
    vocab = tok.get_vocab()
    assert tok.eos_token_id == max(vocab.values())
    assert tok.bos_token_id != tok.eos_token_id
    assert len(set(vocab.values())) == len(vocab)
    ids = tok("a photo of a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(i < tok.eos_token_id for i in ids[:-1])


@pytest.mark.parametrize("text", ["zebra", "class 42 of 1000", "café crème", "東京タワー", "ünïcödé-ß 😀", "Sneaker"])
def test_tokenizer_round_trip(text):
    tok = build_byte_tokenizer()
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()


def test_tokenizer_saved_and_reloaded(tiny):
    fresh = build_byte_tokenizer()
    for text in ["a photo of a 7.", "東京"]:
        assert tiny.tokenizer(text)["input_ids"] == fresh(text)["input_ids"]


def test_class_prompts_do_not_collapse(tiny):
    prompts = [f"a photo of a {c}." for c in ["cat", "dog", "7", "8", "東京", "ankle boot"]]
    emb = tiny.text_features(prompts)
    d = torch.cdist(emb, emb)
    off = d[~torch.eye(len(prompts), dtype=torch.bool)]
    assert off.min() > 1e-4 * emb.norm(dim=-1).mean()
    # HF's legacy pooling (argmax over ids, used when eos_token_id == 2) must land on the same EOS position
    text_model = tiny.hf.text_model
    old = text_model.eos_token_id
    text_model.eos_token_id = 2
    try:
        legacy = tiny.text_features(prompts)
    finally:
        text_model.eos_token_id = old
    assert torch.allclose(legacy, emb, atol=1e-6)


# ---- loading ---------------------------------------------------------------------------------------------------
def test_load_hub_id_offline_is_one_clear_error():
    with pytest.raises(PatchSAEError) as info:
        load_model("openai/clip-vit-base-patch16")
    msg = str(info.value)
    assert "openai/clip-vit-base-patch16" in msg and "\n" not in msg


def test_load_missing_path(tmp_path):
    with pytest.raises(PatchSAEError) as info:
        load_model(str(tmp_path / "nope" / "clip"))
    assert "\n" not in str(info.value)
    with pytest.raises(PatchSAEError):
        load_model("./no-such-model-folder")


def test_load_folder_without_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PatchSAEError) as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_model_attributes(tiny, tiny_clip_dir):
    assert tiny.name == str(tiny_clip_dir)
    assert tiny.templates == tuple(IMAGENET_TEMPLATES)
    assert all(not p.requires_grad for p in tiny.hf.parameters())
    assert not tiny.hf.training


# ---- templates -------------------------------------------------------------------------------------------------
def test_imagenet_templates():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    for t in IMAGENET_TEMPLATES:
        assert isinstance(t, str) and t.count("{}") == 1
        assert t.replace("{}", "") == t.format("")
        assert "{" not in t.replace("{}", "") and "}" not in t.replace("{}", "")
    # a few of CLIP's well-known prompts
    for known in ("a photo of a {}.", "a bad photo of a {}.", "itap of a {}.", "a origami {}."):
        assert known in IMAGENET_TEMPLATES


# ---- the backbone interface: logit scale, checked fast finisher, frozen-weights fingerprint ----------------
def test_clip_is_a_backbone_with_text_and_its_own_logit_scale(tiny):
    assert isinstance(tiny, Backbone) and tiny.has_text
    assert tiny.logit_scale == pytest.approx(float(torch.exp(tiny.hf.logit_scale)))
    assert tiny.frozen_parameters() == list(tiny.hf.parameters())


@pytest.mark.parametrize("layer", [0, 1])
def test_finisher_is_fast_and_equals_finish_from(tiny, pixels, layer):
    h_BTD = tiny.block_output(pixels, layer)
    finish, fast = tiny.finisher(layer, h_BTD[:1])
    assert fast
    torch.testing.assert_close(finish(h_BTD * 1.3), tiny.finish_from(h_BTD * 1.3, layer), rtol=1e-5, atol=1e-5)


def test_finisher_falls_back_when_the_fast_path_disagrees(tiny, pixels, monkeypatch):
    h_BTD = tiny.block_output(pixels, 0)
    monkeypatch.setattr(tiny, "fast_finisher", lambda layer: lambda h: tiny.finish_from(h, layer) + 1e-2)
    finish, fast = tiny.finisher(0, h_BTD)
    assert not fast
    torch.testing.assert_close(finish(h_BTD), tiny.finish_from(h_BTD, 0), rtol=0, atol=0)


class _Injecting(ClipModel):
    """Adds a constant to every token before block 1 and says so through `plain_blocks_start`."""

    def _finish(self, h_BTD, start):
        for i in range(start, self.n_layers):
            h_BTD = self.blocks[i](h_BTD + (0.5 if i == 1 else 0.0), None)
        return self._head(h_BTD[:, 0])

    def plain_blocks_start(self):
        return 2


def test_no_fast_finisher_over_blocks_that_are_not_plain(tiny, pixels):
    model = _Injecting(tiny.hf, tiny.tokenizer, tiny.preprocess, "injecting", tiny.templates)
    assert model.fast_finisher(0) is None  # block 1 has an injection before it
    assert model.fast_finisher(1) is not None
    h_BTD = model.block_output(pixels, 0)
    finish, fast = model.finisher(0, h_BTD)
    assert not fast
    torch.testing.assert_close(finish(h_BTD), model.finish_from(h_BTD, 0), rtol=0, atol=0)


def test_no_fast_finisher_for_a_block_type_it_does_not_know(tiny_clip_dir):
    class Layer(CLIPEncoderLayer):
        pass

    model = load_model(str(tiny_clip_dir))
    model.blocks[-1].__class__ = Layer
    assert model.fast_finisher(0) is None and model.fast_finisher(-2) is None


def test_frozen_fingerprint_sees_any_weight_change_a_sum_would_miss(tiny_clip_dir, pixels):
    model = load_model(str(tiny_clip_dir))
    before = model.frozen_fingerprint()
    model.image_features(pixels), model.text_head(["a", "b"])
    assert model.frozen_fingerprint() == before
    w = model.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        w[[0, 1]] = w[[1, 0]].clone()  # the sum of every weight is unchanged
    assert model.frozen_fingerprint() != before
    other = ClipModel(copy.deepcopy(model.hf), model.tokenizer, model.preprocess, "copy", model.templates)
    assert other.frozen_fingerprint() == model.frozen_fingerprint()
