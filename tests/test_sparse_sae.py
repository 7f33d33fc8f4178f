"""The sparse TopK path against a dense reference, BatchTopK (batch selection, threshold estimate, inference as
JumpReLU, exact resume) and JumpReLU (forward, straight-through threshold gradient, training)."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.sae.checkpoint import load_sae, load_training_state, save_sae
from patchsae.sae.model import SAE, SAEConfig
from patchsae.sae.train import TrainConfig, train_sae

from helpers import MemTokens, _data


pytestmark = pytest.mark.usefixtures("one_thread")




def _sae(arch, seed=0, d_model=16, d_sae=64, **kw):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d_model, d_sae=d_sae, arch=arch, **kw))
    x = _data(n=256, d=d_model, seed=seed)
    sae.init_from_sample(x)
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn(d_sae))
    return sae, x


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _grads(loss, sae):
    return torch.autograd.grad(loss, [getattr(sae, n) for n in PARAMS])


# ---- sparse TopK == dense TopK -----------------------------------------------------------------------------

def _dense_topk_loss(sae, x, dead=None):
    """Reference: the whole (tokens x d_sae) computation, written out independently of the module."""
    xs = x * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    r = F.relu(pre)
    top = r.topk(sae.cfg.k, dim=-1).indices
    mask = torch.zeros_like(r).scatter_(-1, top, 1.0)
    f = r * mask
    xhat = f @ sae.W_dec + sae.b_dec
    err = xhat - xs
    mse = err.pow(2).mean()
    if dead is None:
        return xhat, mse
    aux_k = min(sae.cfg.aux_k or sae.cfg.d_model // 2, int(dead.sum()))
    top_dead = pre.detach().masked_fill(~dead, -torch.inf).topk(aux_k, dim=-1).indices
    f_aux = F.relu(pre) * torch.zeros_like(pre).scatter_(-1, top_dead, 1.0)
    resid = (-err).detach()
    aux = (f_aux @ sae.W_dec - resid).pow(2).mean() / (resid - resid.mean(0)).pow(2).mean()
    return xhat, mse + sae.cfg.aux_coeff * aux


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_topk_matches_dense_forward_and_gradients(with_dead):
    sae, x = _sae("topk", k=6)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::5] = True
    dead = dead if with_dead else None

    vals, idx = sae.encode_sparse(x)
    assert vals.shape == idx.shape == (len(x), 6)
    xhat_sparse = sae.decode_sparse(vals, idx)
    xhat_ref, loss_ref = _dense_topk_loss(sae, x, dead)
    assert torch.allclose(xhat_sparse * sae.input_scale, xhat_ref, atol=1e-5)
    # the module's dense encode agrees with the sparse pairs
    f = sae.encode(x)
    assert torch.allclose(torch.zeros_like(f).scatter_(-1, idx, vals), f, atol=1e-6)

    loss, parts = sae.loss(x, dead)
    assert ("aux" in parts) == with_dead
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5, abs=1e-6)
    for name, g, g_ref in zip(PARAMS, _grads(loss, sae), _grads(loss_ref, sae)):
        assert torch.allclose(g, g_ref, atol=1e-5), (name, (g - g_ref).abs().max())
        assert g.abs().sum() > 0, name


def test_sparse_training_path_never_builds_a_graph_through_the_dense_preacts(monkeypatch):
    """Whatever (tokens x d_sae) tensor exists in the loss must be graph-free: backward sees only k per token."""
    sae, x = _sae("topk", k=4)
    seen = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_mm(a, b)
        seen.append((tuple(out.shape), out.requires_grad))
        return out

    real_addmm = torch.addmm

    def spy_addmm(*args, **kw):
        out = real_addmm(*args, **kw)
        seen.append((tuple(out.shape), out.requires_grad))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    monkeypatch.setattr(torch, "addmm", spy_addmm)
    loss, _ = sae.loss(x, torch.arange(64) % 3 == 0)
    loss.backward()
    dense = [rg for shape, rg in seen if shape == (len(x), 64)]
    assert dense and not any(dense)
    assert sae.W_enc.grad is not None and sae.W_dec.grad is not None


# ---- BatchTopK ---------------------------------------------------------------------------------------------

def test_batchtopk_keeps_exactly_batch_times_k_and_tracks_threshold():
    sae, x = _sae("batchtopk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(20.0)  # every pre-activation positive, so the batch selection decides alone
    xb = x[:32]
    pre = sae.pre_acts(xb).detach()
    f = sae.encode(xb, inference=False).detach()
    assert int((f != 0).sum()) == 32 * 5
    assert ((f != 0).sum(-1) != 5).any()  # not per-token TopK
    kept = f[f != 0]
    assert kept.min() >= pre[f == 0].max()  # the largest ones, wherever they fall
    vals, idx = sae.encode_sparse(xb, inference=False)
    assert int((vals != 0).sum()) == 32 * 5
    assert torch.allclose(torch.zeros_like(f).scatter_add_(-1, idx, vals.detach()), f, atol=1e-5)

    assert sae.threshold.item() == 0
    sae.train()
    _, parts = sae.loss(xb)
    assert parts["l0"].item() == pytest.approx(5.0)
    first = sae.threshold.item()
    assert first == pytest.approx(kept.min().item(), rel=1e-6)  # first batch sets it
    _, _ = sae.loss(x[32:64])
    lo2 = sae.encode(x[32:64], inference=False).detach()
    lo2 = lo2[lo2 > 0].min().item()
    assert sae.threshold.item() == pytest.approx(first + 0.01 * (lo2 - first), rel=1e-5)
    sae.eval()
    before = sae.threshold.item()
    sae.loss(x[64:96])
    assert sae.threshold.item() == before  # evaluation does not move it


def test_batchtopk_inference_is_jumprelu_and_threshold_survives_save_load(tmp_path):
    sae, x = _sae("batchtopk", k=8)
    sae.train()
    for s in range(0, 256, 64):
        sae.loss(x[s: s + 64])
    theta = sae.threshold.item()
    assert theta > 0
    save_sae(tmp_path, sae)
    loaded, meta = load_sae(tmp_path)
    assert meta["sae"]["arch"] == "batchtopk"
    assert loaded.threshold.item() == theta

    # hand computation of the JumpReLU with that threshold
    W_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    pre = (x.double() * sae.input_scale.item() - sae.b_dec.detach().double()) @ W_enc + b_enc
    expected = pre * (pre > theta)
    assert (expected > 0).any() and ((pre > 0) & (pre <= theta)).any()  # the threshold matters here
    for model in (sae, loaded):
        assert torch.allclose(model.encode(x).double(), expected, atol=1e-5)
        model.eval()
        assert torch.allclose(model.encode(x).double(), expected, atol=1e-5)
        vals, idx = model.encode_sparse(x)
        dense = torch.zeros(len(x), 64, dtype=torch.float64).scatter_add_(-1, idx, vals.detach().double())
        assert torch.allclose(dense, expected, atol=1e-5)


BTK_CFG = SAEConfig(d_model=16, d_sae=64, arch="batchtopk", k=4, dead_steps=4)
BTK_TRAIN = TrainConfig(total_tokens=30 * 64, batch_tokens=64, lr=1e-2, warmup_steps=5, seed=3, init_tokens=512,
                        checkpoint_every=7, log_every=1)


def test_batchtopk_resume_after_interruption_gives_identical_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    full = train_sae(BTK_CFG, BTK_TRAIN, MemTokens(_data()), a, progress=False)
    with open(a / "train_log.csv") as f:
        assert max(float(r["dead_fraction"]) for r in csv.DictReader(f)) > 0  # AuxK ran
    with pytest.raises(RuntimeError):
        train_sae(BTK_CFG, BTK_TRAIN, MemTokens(_data(), fail_after=17), b, progress=False)
    step, _, _ = load_training_state(b / "checkpoint.safetensors", SAE(BTK_CFG),
                                               torch.optim.Adam(SAE(BTK_CFG).parameters()))
    assert step == 14
    resumed = train_sae(BTK_CFG, BTK_TRAIN, MemTokens(_data()), b, progress=False)
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert full.threshold.item() > 0
    saved, _ = load_sae(b)
    assert saved.threshold.item() == full.threshold.item()


# ---- JumpReLU ----------------------------------------------------------------------------------------------

def test_jumprelu_forward_and_straight_through_threshold_gradient():
    sae, x = _sae("jumprelu", bandwidth=0.1)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.rand(64).mul(0.5).add(0.05).log())
    theta = sae.log_threshold.exp().detach()
    pre = sae.pre_acts(x).detach()
    f = sae.encode(x)
    assert torch.allclose(f.detach(), pre * (pre > theta))
    assert ((pre > 0) & (pre <= theta)).any() and (pre > theta).any()

    # d f / d log_theta via the STE: -(theta / eps) * K((pre - theta) / eps) * theta (chain rule through exp)
    g_out = torch.randn_like(f)
    (g_log,) = torch.autograd.grad((f * g_out).sum(), [sae.log_threshold])
    near = ((pre - theta).abs() < 0.05).float()
    expected = (-(theta / 0.1) * near * g_out).sum(0) * theta
    assert torch.allclose(g_log, expected, atol=1e-5)
    far = near.sum(0) == 0
    assert far.any() and (~far).any()
    assert (g_log[far] == 0).all() and (g_log[~far] != 0).all()

    # the L0 term: gradient only to theta, again only from pre-activations within the window
    sae.zero_grad()
    loss, parts = sae.loss(x)
    mse = (sae.decode_scaled(sae.encode(x)) - x * sae.input_scale).pow(2).mean()
    l0 = (pre > theta).float().sum(-1).mean()
    assert loss.item() == pytest.approx((mse + sae.cfg.l0_coeff * l0).item(), rel=1e-5)
    assert parts["l0"].item() == pytest.approx(l0.item())
    (g_enc,) = torch.autograd.grad(loss, [sae.W_enc], retain_graph=True)
    (g_mse,) = torch.autograd.grad(mse, [sae.W_enc])
    assert torch.allclose(g_enc, g_mse, atol=1e-6)  # the L0 penalty sends nothing to the encoder


def test_jumprelu_trains_and_keeps_decoder_rows_unit_norm(tmp_path):
    cfg = SAEConfig(d_model=16, d_sae=64, arch="jumprelu", l0_coeff=1e-2, bandwidth=0.05)
    train = TrainConfig(total_tokens=15 * 64, batch_tokens=64, lr=1e-2, warmup_steps=2, init_tokens=512,
                        checkpoint_every=5, log_every=1)
    sae = train_sae(cfg, train, MemTokens(_data()), tmp_path, progress=False)
    assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(64), atol=1e-5)
    assert not torch.allclose(sae.log_threshold.detach(), torch.full((64,), cfg.init_threshold).log())
    loaded, _ = load_sae(tmp_path)
    assert torch.equal(loaded.log_threshold, sae.log_threshold.detach())


@pytest.mark.parametrize("kw", [dict(arch="BatchTopK"), dict(arch="batchtopk", k=0), dict(arch="batchtopk", k=65),
                                dict(arch="jumprelu", bandwidth=0.0), dict(arch="jumprelu", init_threshold=-1.0)])
def test_new_arch_config_validation(kw):
    with pytest.raises(PatchSAEError):
        SAEConfig(d_model=16, d_sae=64, **kw)
