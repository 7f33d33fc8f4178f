"""The reference objective (SAEConfig(objective="reference")) against an independent plain-autograd
implementation of the reference code's formulas (shared/DESIGN.md section 6), written here on (images, tokens,
dim) batches with the CLS token at row 0 as the reference holds them: values and gradients, on a hand example and
on random data, for every training path (dense, sparse, each with and without ghost grads)."""

from __future__ import annotations

import pytest
import torch

from patchsae import PatchSAEError
from patchsae.sae import relu as R
from patchsae.sae.model import SAE, ReferenceReLUSAE, SAEConfig, geometric_median

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def independent_reference_loss(x_BTD, W_enc, b_enc, W_dec, b_dec, lam, cls_coeff, dead_S=None):
    """loss = mse + lambda * sparsity + ghost, per the reference (float, autograd only)."""
    f = torch.relu((x_BTD - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    e = (x_hat - x_BTD) ** 2 / (x_BTD ** 2).sum(-1, keepdim=True).sqrt()  # per element, token L2 norm
    weight_T = torch.ones(x_BTD.shape[1], dtype=x_BTD.dtype)
    weight_T[0] = cls_coeff  # CLS rows
    mse = (e * weight_T[None, :, None]).mean()
    sparsity = f.abs().sum(-1).mean()
    loss = mse + lam * sparsity
    if dead_S is not None and dead_S.any():
        resid = x_BTD - x_hat
        pre_dead = ((x_BTD - b_dec) @ W_enc + b_enc)[..., dead_S]
        ghost = torch.exp(pre_dead) @ W_dec[dead_S]
        ghost = ghost * (resid.norm(dim=-1) / (1e-6 + 2 * ghost.norm(dim=-1)))[..., None].detach()
        g = (ghost - resid.detach()) ** 2 / (resid.detach() ** 2).sum(-1, keepdim=True).sqrt()
        loss = loss + ((e / (g + 1e-6)).detach() * g).mean()
    return loss


def _ours(sae, x_BTD, dead_S, shuffle_seed=0):
    """Our loss on the batch flattened to tokens and shuffled, as a token source yields it."""
    B, T, D = x_BTD.shape
    perm = torch.randperm(B * T, generator=torch.Generator().manual_seed(shuffle_seed))
    x_ND = x_BTD.reshape(-1, D)[perm]
    cls_N = (torch.arange(B * T) % T == 0)[perm]
    return sae.loss(x_ND, dead_S, cls_N=cls_N)


def _check(sae, x_BTD, dead_S, monkeypatch, path):
    monkeypatch.setattr(R, "RELU_SPARSE_DENSITY", {"dense": 0.0, "sparse": 1.0}[path])
    params = [getattr(sae, p) for p in PARAMS]
    loss, parts = _ours(sae, x_BTD, dead_S)
    got = torch.autograd.grad(loss, params)
    ref = independent_reference_loss(x_BTD, *params, sae.cfg.l1_coeff, sae.cfg.mse_cls_coefficient, dead_S)
    want = torch.autograd.grad(ref, params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-14)
    for name, g, w in zip(PARAMS, got, want):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12), name
    assert ("ghost" in parts) == (dead_S is not None and bool(dead_S.any()))
    return loss, parts


def _hand_sae(**kw):
    sae = SAE(SAEConfig(d_model=2, d_sae=2, objective="reference", l1_coeff=0.1, **kw)).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_hand_example(monkeypatch, path):
    """One image of two tokens: CLS x = (3, 4), ||x|| = 5; patch x = (0, 2), ||x|| = 2. f = relu(x - 1) =
    (2, 3), (0, 1); x_hat = f; err^2 / ||x|| = (1/5, 1/5), (0, 1/2). With the CLS rows weighted 3:
    mse = (3 * 0.4 + 0.5) / 4 = 0.425; sparsity = (5 + 1) / 2 = 3; loss = 0.425 + 0.1 * 3 = 0.725."""
    sae = _hand_sae(mse_cls_coefficient=3.0)
    x_BTD = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]], dtype=torch.float64)
    loss, parts = _check(sae, x_BTD, None, monkeypatch, path)
    assert loss.item() == pytest.approx(0.725, abs=1e-12)
    assert parts["mse"].item() == pytest.approx(0.425, abs=1e-12)
    assert parts["l1"].item() == pytest.approx(3.0, abs=1e-12)
    # ghost grads with latent 0 dead: the term's value is the unweighted mse, mean(err^2 / ||x||) = 0.9 / 4,
    # up to the reference's 1e-6 in the ratio (elements whose ghost error is 0 contribute 0)
    loss_g, parts_g = _check(sae, x_BTD, torch.tensor([True, False]), monkeypatch, path)
    assert parts_g["ghost"].item() == pytest.approx(0.225, rel=1e-4)


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("dead", [False, True])
@pytest.mark.parametrize("cls_coeff", [1.0, 0.25])
def test_random_batches_every_path(monkeypatch, path, dead, cls_coeff):
    torch.manual_seed(3)
    B, T, D, S = 5, 7, 8, 48
    sae = SAE(SAEConfig(d_model=D, d_sae=S, objective="reference", l1_coeff=0.03,
                        mse_cls_coefficient=cls_coeff)).double()
    x_BTD = (torch.randn(B, T, D) * 2 + 0.7).double()
    x_BTD[:, 0] *= 4  # CLS rows larger, as in CLIP
    sae.init_from_sample(x_BTD.reshape(-1, D))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # a mix of active and inactive pairs
    dead_S = (torch.arange(S) % 5 == 1) if dead else None
    loss, parts = _check(sae, x_BTD, dead_S, monkeypatch, path)
    f = torch.relu(sae.pre_acts(x_BTD.reshape(-1, D)))
    assert 0 < (f > 0).float().mean() < 0.9


def test_initialisation_is_the_references():
    """Kaiming-uniform W_enc then W_dec drawn independently (in that order), decoder rows unit, b_enc 0;
    init_from_sample: b_dec = geometric median of the raw sample, input_scale stays 1."""
    D, S = 6, 20
    torch.manual_seed(11)
    sae = SAE(SAEConfig(d_model=D, d_sae=S, objective="reference"))
    assert type(sae) is ReferenceReLUSAE
    torch.manual_seed(11)
    W_enc = torch.empty(D, S).uniform_(-(6 / S) ** 0.5, (6 / S) ** 0.5)  # gain sqrt(2) * sqrt(3 / fan_in)
    W_dec = torch.empty(S, D).uniform_(-(6 / D) ** 0.5, (6 / D) ** 0.5)
    assert torch.allclose(sae.W_enc, W_enc, atol=1e-6)
    assert torch.allclose(sae.W_dec, W_dec / W_dec.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.count_nonzero(sae.b_enc) == 0
    x = torch.randn(300, D) * 5 + 2
    sae.init_from_sample(x)
    assert sae.input_scale.item() == 1.0
    assert torch.allclose(sae.b_dec, geometric_median(x), atol=1e-6)


def test_config_validation_and_json():
    with pytest.raises(PatchSAEError, match="reference objective is the ReLU SAE's"):
        SAEConfig(d_model=4, d_sae=16, arch="topk", k=2, objective="reference")
    with pytest.raises(PatchSAEError, match="unknown SAE objective 'paper'"):
        SAEConfig(d_model=4, d_sae=16, objective="paper")
    with pytest.raises(PatchSAEError, match="weights the reference objective's MSE"):
        SAEConfig(d_model=4, d_sae=16, mse_cls_coefficient=2.0)
    # the defaults stay out of the JSON, so configs written before these fields existed read back equal
    assert "objective" not in SAEConfig(d_model=4, d_sae=16).to_json()
    cfg = SAEConfig(d_model=4, d_sae=16, objective="reference", mse_cls_coefficient=0.5)
    assert SAEConfig(**cfg.to_json()) == cfg and cfg.to_json()["objective"] == "reference"


def test_cls_weight_without_cls_rows_is_one_clear_error():
    sae = _hand_sae(mse_cls_coefficient=2.0)
    with pytest.raises(PatchSAEError, match="needs the CLS rows"):
        sae.loss(torch.ones(3, 2, dtype=torch.float64))


# ---- the trainer passes the CLS rows ---------------------------------------------------------------------------

class ClsTokens:
    """In-memory source of whole images (T tokens each, CLS first), shuffled per step, that says which rows
    are CLS when asked (the contract of CachedTokens / StreamedTokens)."""

    def __init__(self, x_BTD):
        self.x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        self.cls_N = (torch.arange(len(self.x_ND)) % x_BTD.shape[1] == 0)
        self.n_tokens = len(self.x_ND)

    def sample(self, n):
        return self.x_ND[:n].clone()

    def batches(self, batch_size, start_step=0, rank=0, world=1, with_cls=False):
        step = start_step
        while True:
            pick = torch.randperm(self.n_tokens, generator=torch.Generator().manual_seed(step))[:batch_size]
            yield (self.x_ND[pick], self.cls_N[pick]) if with_cls else self.x_ND[pick]
            step += 1


def test_trainer_feeds_cls_rows_to_the_reference_loss(tmp_path):
    """train_sae with mse_cls_coefficient equals a hand loop of train_step given each batch's CLS rows."""
    from patchsae.sae.train import TrainConfig, make_optimizer, train_sae, train_step

    from helpers import MemTokens

    x_BTD = torch.randn(40, 5, 8) * 3 + 1
    source = ClsTokens(x_BTD)
    cfg = SAEConfig(d_model=8, d_sae=32, objective="reference", l1_coeff=0.02, mse_cls_coefficient=0.3, dead_steps=2)
    tcfg = TrainConfig(total_tokens=6 * 50, batch_tokens=50, lr=1e-2, warmup_steps=2, seed=1, init_tokens=100,
                       checkpoint_every=100, log_every=100)
    trained = train_sae(cfg, tcfg, source, tmp_path / "run", progress=False)

    torch.manual_seed(1)
    sae = SAE(cfg)
    opt = make_optimizer(sae, tcfg.lr)
    sae.init_from_sample(source.sample(100))
    sae.normalize_decoder()
    since = torch.zeros(32, dtype=torch.long)
    batches = source.batches(50, with_cls=True)
    for step in range(6):
        for g in opt.param_groups:
            g["lr"] = tcfg.lr * min(1.0, (step + 1) / 2)
        x_ND, cls_N = next(batches)
        train_step(sae, opt, x_ND, since, cls_N=cls_N)
    for name in PARAMS:
        assert torch.equal(getattr(trained, name), getattr(sae, name)), name

    with pytest.raises(PatchSAEError, match="does not say"):
        train_sae(cfg, tcfg, MemTokens(x_BTD.reshape(-1, 8)), tmp_path / "other", progress=False)
