"""CLIP, SigLIP and DINOv2 (plain and with registers) through the one backbone interface, each built from its
transformers config at base size (768 wide, 12 heads, real patch and image sizes; 3 blocks instead of 12, which
no check here needs) with random weights and saved as a model folder with its own preprocessor config.

For each: our preprocessing equals the model's own HF image processor (PIL backend: transformers' torchvision
backend needs torchvision, which is not installed) on non-square images; the hooked block output, read by early
exit and by a hook inside the full forward, equals the model's own hidden_states on the processor's pixels; an
identity splice and `finish_from` give the model's own image features; the token layout names every row."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from patchsae import PatchSAEError
from patchsae.models.clip import ClipModel
from patchsae.models.dinov2 import Dinov2Backbone
from patchsae.models.load import load_model
from patchsae.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess_from_config
from patchsae.models.siglip import SiglipBackbone
from patchsae.models.tokenizer import build_byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS = 3
ATOL = 1e-5


def _images() -> list[Image.Image]:
    """Noise (so any resampling difference shows): wide, tall, square at the input size, and RGBA."""
    rng = np.random.default_rng(0)
    arr = lambda h, w, c=3: rng.integers(0, 256, (h, w, c), dtype=np.uint8)  # noqa: E731
    return [Image.fromarray(arr(200, 301)), Image.fromarray(arr(263, 150)), Image.fromarray(arr(224, 224)),
            Image.fromarray(arr(180, 240, 4), "RGBA")]


def _clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=dict(num_hidden_layers=N_LAYERS, patch_size=16, image_size=224),
                     text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                      num_hidden_layers=1, vocab_size=258, bos_token_id=256, eos_token_id=257,
                                      pad_token_id=257), projection_dim=512)
    CLIPModel(cfg).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)  # HF's own defaults: short side 224, bicubic, crop 224
    return load_model(str(folder)), CLIPImageProcessorPil.from_pretrained(folder)


def _siglip(folder):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    torch.manual_seed(1)
    cfg = SiglipConfig(vision_config=dict(num_hidden_layers=N_LAYERS),
                       text_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=258, max_position_embeddings=16,
                                        projection_size=768, bos_token_id=256, eos_token_id=257, pad_token_id=257))
    model = SiglipModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)
    build_byte_tokenizer(16).save_pretrained(folder)
    SiglipImageProcessorPil().save_pretrained(folder)  # 224 x 224 without keeping the aspect, mean = std = 0.5
    return load_model(str(folder)), SiglipImageProcessorPil.from_pretrained(folder)


def _dinov2(folder, registers: bool):
    from transformers import (BitImageProcessorPil, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig,
                              Dinov2WithRegistersModel)

    torch.manual_seed(2)
    kw = dict(num_hidden_layers=N_LAYERS, patch_size=14, image_size=518)  # the hub models' sizes
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw)) if registers
             else Dinov2Model(Dinov2Config(**kw)))
    model.save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(folder)
    return load_model(str(folder)), BitImageProcessorPil.from_pretrained(folder)


FAMILIES = {"clip": _clip, "siglip": _siglip, "dinov2": lambda f: _dinov2(f, False),
            "dinov2_reg": lambda f: _dinov2(f, True)}
KINDS = {"clip": {"cls": 1, "patch": 196}, "siglip": {"patch": 196}, "dinov2": {"cls": 1, "patch": 256},
         "dinov2_reg": {"cls": 1, "register": 4, "patch": 256}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, backbone, HF image processor, processor pixels, HF hidden_states, HF image features)."""
    model, proc = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    px = proc(_images(), return_tensors="pt")["pixel_values"]
    hf = model.hf
    with torch.no_grad():
        if isinstance(model, Dinov2Backbone):
            out = hf(pixel_values=px, output_hidden_states=True)
            hidden, feats = out.hidden_states, out.pooler_output
        else:
            hidden = hf.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
            feats = hf.get_image_features(pixel_values=px).pooler_output
    return request.param, model, proc, px, hidden, feats


def test_preprocessing_equals_the_models_own_image_processor(family):
    _, model, _, px, _, _ = family
    ours = model.preprocess(_images())
    assert ours.shape == px.shape
    assert (ours - px).abs().max().item() <= 1e-6  # same PIL resampling; float64 -> float32 rounding only


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_block_output_equals_hidden_states(family, layer):
    name, model, _, px, hidden, _ = family
    L = model.resolve_layer(layer)
    want = hidden[L + 1]
    torch.testing.assert_close(model.block_output(px, layer), want, rtol=0, atol=ATOL)
    seen = []
    with model.replace_block_output(layer, lambda h: seen.append(h.clone()) or h):
        model.image_features(px)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=ATOL)
    if L > 0:  # a neighbouring layer would not pass
        assert (model.block_output(px, layer) - hidden[L]).abs().max() > 1e-2


def test_identity_splice_and_finish_from_give_the_models_own_output(family):
    _, model, _, px, _, feats = family
    torch.testing.assert_close(model.image_features(px), feats, rtol=0, atol=ATOL)
    with model.replace_block_output(1, lambda h: h * 1.0):
        torch.testing.assert_close(model.image_features(px), feats, rtol=0, atol=ATOL)
    for layer in (0, 1, -1):
        h = model.block_output(px, layer)
        torch.testing.assert_close(model.finish_from(h, layer), feats, rtol=0, atol=ATOL)


def test_token_layout(family):
    name, model, _, px, hidden, _ = family
    layout = model.layout()
    kinds = layout.kinds()
    assert len(kinds) == layout.n_tokens == hidden[0].shape[1] == model.block_output(px, 0).shape[1]
    assert {k: kinds.count(k) for k in set(kinds)} == KINDS[name]
    mask = layout.image_token_mask()
    assert int(mask.sum()) == KINDS[name].get("cls", 0) + KINDS[name]["patch"]  # registers kept apart
    if name == "dinov2_reg":  # registers sit after CLS: at the embedding, those rows are the learnt registers
        regs = model.hf.embeddings.register_tokens[0]
        torch.testing.assert_close(hidden[0][:, 1:5], regs.expand(len(px), -1, -1), rtol=0, atol=0)
    assert model.has_text == (name in ("clip", "siglip"))


def test_text_head_and_zero_shot_probabilities(family):
    name, model, _, px, _, _ = family
    if not model.has_text:
        with pytest.raises(PatchSAEError, match="no text tower"):
            model.text_head(["a", "b"])
        with pytest.raises(PatchSAEError, match="no text tower"):
            model.logit_scale
        return
    names = ["shirt", "boot", "bag"]
    head = model.text_head(names, templates=("{}",))
    tok = model.tokenizer(names, return_tensors="pt", **(
        dict(padding="max_length", max_length=16) if name == "siglip" else dict(padding=True)))
    with torch.no_grad():
        out = model.hf(pixel_values=px, **({"input_ids": tok["input_ids"]} if name == "siglip" else dict(tok)))
    got = model.zero_shot_probs(model.image_features(px), head)
    want = torch.sigmoid(out.logits_per_image) if name == "siglip" else out.logits_per_image.softmax(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if name == "siglip":
        assert model.logit_bias == pytest.approx(-2.0) and model.logit_scale == pytest.approx(10.0)
        assert not torch.allclose(got.sum(-1), torch.ones(len(px)))  # independent sigmoids, not a softmax


def test_clip_family_is_the_clip_model(family):
    name, model, *_ = family
    assert isinstance(model, {"clip": ClipModel, "siglip": SiglipBackbone}.get(name, Dinov2Backbone))


# ---- preprocessing configs -----------------------------------------------------------------------------------
def test_preprocess_config_rules():
    dino = preprocess_from_config({"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 256},
                                   "crop_size": {"height": 224, "width": 224}, "resample": 3})
    assert (dino.size, dino.shortest_edge, dino.center_crop, dino.fixed_side) == (224, 256, True, None)
    sig = preprocess_from_config({"image_processor_type": "SiglipImageProcessor", "size": {"height": 384,
                                                                                          "width": 384}})
    assert (sig.size, sig.fixed_side, sig.center_crop, sig.mean) == (384, 384, False, (0.5, 0.5, 0.5))
    legacy = preprocess_from_config({"size": 224, "crop_size": 224})  # old CLIP configs: int sizes
    assert (legacy.size, legacy.shortest_edge) == (224, 224)
    for bad, msg in (({"image_processor_type": "ViTImageProcessor"}, "not supported"),
                     ({"size": {"height": 224, "width": 200}, "do_center_crop": False}, "square sizes only"),
                     ({"size": {"shortest_edge": 224}, "do_center_crop": False}, "varying shape"),
                     ({"do_resize": False}, "do_resize")):
        with pytest.raises(PatchSAEError, match=msg):
            preprocess_from_config(bad)


def test_loading_refuses_unknown_families_and_mismatched_preprocessing(tmp_path, tiny_clip_dir):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(PatchSAEError, match="'vit' is not a supported backbone.*siglip.*dinov2_with_registers"):
        load_model(str(tmp_path / "vit"))
    bad = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    (bad / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 32}, "crop_size": 32}')
    with pytest.raises(PatchSAEError, match="makes 32x32 images but the model takes 28x28"):
        load_model(str(bad))


# ---- the new families through the command line (tiny random models) ------------------------------------------
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)


def test_dinov2_with_registers_caches_and_trains_from_the_command_line(tmp_path):
    from transformers import BitImageProcessorPil, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from patchsae import cli
    from patchsae.activations.cache import ActivationCache

    torch.manual_seed(0)
    folder = tmp_path / "dino"
    cfg = Dinov2WithRegistersConfig(**SMALL, patch_size=7, image_size=28, num_register_tokens=4)
    Dinov2WithRegistersModel(cfg).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    run = tmp_path / "run"
    assert cli.main(["cache", "--run", str(run), "--model", str(folder), "--max-train-images", "24",
                     "--batch-tokens", "64"]) == 0
    cache = ActivationCache(run / "cache" / "train")
    assert cache.kinds == ["cls"] + ["register"] * 4 + ["patch"] * 16
    assert cli.main(["train", "--run", str(run)]) == 0
    assert (run / "sae").is_dir()


def test_siglip_quickstart_runs_end_to_end(tmp_path):
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    from patchsae import cli
    from patchsae.utils import read_json

    torch.manual_seed(0)
    folder = tmp_path / "siglip"
    SiglipModel(SiglipConfig(vision_config=dict(SMALL, patch_size=7, image_size=28),
                             text_config=dict(SMALL, vocab_size=258, max_position_embeddings=64, projection_size=32,
                                              bos_token_id=256, eos_token_id=257, pad_token_id=257))
                ).save_pretrained(folder)
    build_byte_tokenizer(64).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(folder)
    run = tmp_path / "run"
    assert cli.main(["quickstart", "--run", str(run), "--model", str(folder), "--max-train-images", "48",
                     "--max-eval-images", "24", "--expansion", "4", "--warmup-steps", "2"]) == 0
    summary = read_json(run / "summary.json")
    assert summary["d_model"] == 32 and 0 <= summary["zero_shot_accuracy"] <= 1
