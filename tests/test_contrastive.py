"""Table 2's contrastive losses against Hugging Face's own CLIPModel(return_loss=True).loss on a tiny random
CLIP: unedited, and with the hooked block's CLS token (or every token) replaced through a hook on HF's layer."""

from __future__ import annotations

import math

import pytest
import torch

from patchsae.analysis.contrastive import (captions, clip_contrastive_loss, contrastive_loss_score,
                                           contrastive_losses, mean_over_batches)
from patchsae.models.load import load_model
from patchsae.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1  # of the tiny CLIP's 3 blocks
CLASSES = ["cat", "dog", "ship", "plane", "frog"]


@pytest.fixture(scope="module")
def setup(tiny_clip_dir, tmp_path_factory):
    """The tiny CLIP with random layer-norm biases: at its init (biases 0) a zeroed residual stream stays 0 up
    to the embedding, which HF turns into NaN (0 / 0); a real CLIP never maps to exactly 0."""
    import shutil

    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("clip") / "m"
    shutil.copytree(tiny_clip_dir, folder)
    hf = CLIPModel.from_pretrained(str(folder)).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for m in hf.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.bias.normal_(0, 0.5)
    hf.save_pretrained(folder)
    model = load_model(str(folder))
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, 28, 28)
    labels = [0, 1, 2, 3, 4, 1]  # two images of one class, as in a real batch
    sae = SAE(SAEConfig(d_model=32, d_sae=128, objective="reference", l1_coeff=1e-3))
    sae.init_from_sample(model.block_output(pixels, LAYER).reshape(-1, 32))
    return model, hf, pixels, captions(CLASSES, labels), sae


def _hf_loss(hf, model, pixels, texts, edit=None):
    """HF's loss, with `edit` applied to the output of vision layer LAYER by a hook on HF's module."""
    tok = model.tokenizer(texts, padding=True, return_tensors="pt")

    def hook(_m, _inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h = edit(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hf.vision_model.encoder.layers[LAYER].register_forward_hook(hook) if edit else None
    try:
        with torch.no_grad():
            return hf(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels,
                      return_loss=True).loss.item()
    finally:
        if handle:
            handle.remove()


def test_losses_equal_hf_clip_loss_for_every_edit(setup):
    model, hf, pixels, texts, sae = setup
    scale = hf.logit_scale.exp().item()
    assert model.logit_scale == pytest.approx(scale)
    got = contrastive_losses(model, sae, pixels, model.text_features(texts), LAYER)

    def cls_to(fn):
        def edit(h):
            h = h.clone()
            h[:, 0] = fn(h[:, 0])
            return h
        return edit

    want = {"contrastive_loss_original": _hf_loss(hf, model, pixels, texts),
            "contrastive_loss_sae_cls": _hf_loss(hf, model, pixels, texts, cls_to(lambda c: sae(c)[0])),
            "contrastive_loss_zero_cls": _hf_loss(hf, model, pixels, texts, cls_to(torch.zeros_like)),
            "contrastive_loss_sae_all": _hf_loss(hf, model, pixels, texts, lambda h: sae(h)[0]),
            "contrastive_loss_zero_all": _hf_loss(hf, model, pixels, texts, torch.zeros_like)}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert len({round(v, 6) for v in want.values()}) == 5  # each edit changes the loss
    assert got["contrastive_loss_score"] == pytest.approx(
        (want["contrastive_loss_sae_cls"] - want["contrastive_loss_original"])
        / (want["contrastive_loss_zero_cls"] - want["contrastive_loss_original"]), rel=1e-4)
    assert got["contrastive_loss_score_all"] == pytest.approx(
        (want["contrastive_loss_sae_all"] - want["contrastive_loss_original"])
        / (want["contrastive_loss_zero_all"] - want["contrastive_loss_original"]), rel=1e-4)


def test_loss_by_hand_and_score_edge_cases():
    """Two orthogonal pairs: logits s * I, each cross-entropy -log(e^s / (e^s + 1)) = log(1 + e^-s)."""
    e = torch.eye(2) * 3.0  # unnormalised: the loss normalises
    assert clip_contrastive_loss(e, e, 2.0).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    assert contrastive_loss_score(2.5, 2.0, 4.0) == 0.25
    assert math.isnan(contrastive_loss_score(2.5, 2.0, 2.0))


def test_mean_over_batches_recomputes_the_score_from_the_means():
    a = {"contrastive_loss_original": 1.0, "contrastive_loss_sae_cls": 2.0, "contrastive_loss_zero_cls": 5.0,
         "contrastive_loss_sae_all": 3.0, "contrastive_loss_zero_all": 5.0}
    b = {"contrastive_loss_original": 3.0, "contrastive_loss_sae_cls": 4.0, "contrastive_loss_zero_cls": 5.0,
         "contrastive_loss_sae_all": 3.0, "contrastive_loss_zero_all": 7.0}
    m = mean_over_batches([a, b])
    assert m["contrastive_loss_original"] == 2.0 and m["contrastive_loss_zero_cls"] == 5.0
    assert m["contrastive_loss_score"] == pytest.approx((3.0 - 2.0) / (5.0 - 2.0))
    assert m["contrastive_loss_score_all"] == pytest.approx((3.0 - 2.0) / (6.0 - 2.0))


def test_contrastive_batches_score_full_batches_of_the_chosen_size(setup):
    """Streamed in batches of 3, scored in batches of 4: the one full batch equals a direct call on the first 4
    images; the remaining 2 are dropped. Fewer images than one batch: they are scored as one smaller batch."""
    from patchsae.analysis.contrastive import ContrastiveBatches

    model, _, pixels, texts, sae = setup
    labels = torch.tensor([CLASSES.index(t.split()[-1]) for t in texts])
    h = model.block_output(pixels, LAYER)
    cb = ContrastiveBatches(model, sae, CLASSES, LAYER, batch_size=4)
    cb.add(h[:3], labels[:3])
    cb.add(h[3:], labels[3:])
    got = cb.result()
    want = contrastive_losses(model, sae, pixels[:4], model.text_features(texts[:4]), LAYER)
    assert got["cl_batch_size"] == 4 and got["cl_batches"] == 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    small = ContrastiveBatches(model, sae, CLASSES, LAYER, batch_size=8)
    small.add(h[:3], labels[:3])
    got = small.result()
    want = contrastive_losses(model, sae, pixels[:3], model.text_features(texts[:3]), LAYER)
    assert got["cl_batch_size"] == 3 and got["cl_batches"] == 1
    assert got["contrastive_loss_sae_cls"] == pytest.approx(want["contrastive_loss_sae_cls"], rel=1e-6)


def test_features_given_by_the_caller_are_used_instead_of_finishing_again(setup):
    """evaluate passes the embeddings it finished for accuracy; wrong ones must change the result, right ones
    must not."""
    from patchsae.analysis.contrastive import losses_from_block

    model, _, pixels, texts, sae = setup
    h = model.block_output(pixels, LAYER)
    text_BE = model.text_features(texts)
    plain = losses_from_block(model, sae, h, text_BE, LAYER)
    given = {"original": model.finish_from(h, LAYER), "sae_all": model.finish_from(sae(h)[0], LAYER),
             "zero_all": model.finish_from(torch.zeros_like(h), LAYER)}
    same = losses_from_block(model, sae, h, text_BE, LAYER, features=given)
    assert same == pytest.approx(plain, rel=1e-6)
    swapped = losses_from_block(model, sae, h, text_BE, LAYER, features={"original": given["zero_all"]})
    assert swapped["contrastive_loss_original"] == pytest.approx(plain["contrastive_loss_zero_all"], rel=1e-6)
