"""The SAE module against independent computations: decoder constraint, geometric median, initialisation,
ghost grads, TopK / AuxK, the loss formulas and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchsae import PatchSAEError
from patchsae.sae.model import SAE, SAEConfig, geometric_median
from patchsae.sae.train import TrainConfig, train_sae

from helpers import MemTokens


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # sparse-ish structured data with a non-zero mean and a few big outlier tokens
    basis = torch.randn(48, d, generator=g)
    codes = torch.relu(torch.randn(n, 48, generator=g) - 1.0)
    x = codes @ basis + 3.0 + 0.05 * torch.randn(n, d, generator=g)
    x[:: 50] *= 20
    return x


def _sum_dist(points: torch.Tensor, m: torch.Tensor) -> float:
    return (points.double() - m.double()).norm(dim=1).sum().item()


def _direct_geometric_median(points: torch.Tensor) -> torch.Tensor:
    """Minimise the sum of Euclidean distances with LBFGS in float64, from the coordinate-wise median."""
    p = points.double()
    m = p.median(0).values.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([m], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = (p - m).pow(2).sum(1).add(1e-18).sqrt().sum()
        obj.backward()
        return obj

    for _ in range(3):
        opt.step(closure)
    return m.detach()


# ---- decoder constraint ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_decoder_rows_unit_norm_at_init_and_after_training(tmp_path, arch):
    cfg = SAEConfig(d_model=16, d_sae=64, arch=arch, k=8)
    torch.manual_seed(1)
    sae = SAE(cfg)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)

    x = _data()
    torch.manual_seed(0)  # train_sae seeds with cfg.seed=0 before building the SAE
    init_W = SAE(cfg).W_dec.detach().clone()
    trained = train_sae(cfg, TrainConfig(total_tokens=12 * 128, batch_tokens=128, lr=1e-2, warmup_steps=2,
                                         init_tokens=512, checkpoint_every=5, log_every=1),
                        MemTokens(x), tmp_path, progress=False)
    norms = trained.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(64), atol=1e-5), norms
    # training did move the decoder (so the check above is not vacuous)
    assert not torch.allclose(trained.W_dec.detach(), init_W, atol=1e-3)


def test_remove_parallel_grads_matches_independent_projection():
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_model=12, d_sae=40))
    g = torch.randn(40, 12) * 3 + 1
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_grads()
    W = sae.W_dec.detach().double()
    G = g.double()
    # independent: g_perp = g - (g.w / w.w) w for each row
    expected = G - ((G * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True)) * W
    got = sae.W_dec.grad.double()
    assert torch.allclose(got, expected, atol=1e-5)
    dots = (got * W).sum(1)
    assert dots.abs().max() < 1e-5 * G.norm(dim=1).max()
    # the perpendicular component is really what was left: the removed part was not negligible
    assert (G - got).norm() > 0.1 * G.norm()


def test_remove_parallel_grads_without_grad_is_noop():
    sae = SAE(SAEConfig(d_model=4, d_sae=8))
    assert sae.W_dec.grad is None
    sae.remove_parallel_grads()
    assert sae.W_dec.grad is None


# ---- geometric median --------------------------------------------------------------------------------------

def test_geometric_median_matches_direct_minimisation_with_outliers():
    g = torch.Generator().manual_seed(7)
    inliers = torch.randn(300, 6, generator=g, dtype=torch.float64)
    outliers = 80.0 + 5 * torch.randn(120, 6, generator=g, dtype=torch.float64)  # 28.6 % far outliers
    pts = torch.cat([inliers, outliers]).float()

    med = geometric_median(pts)
    assert med.dtype == torch.float32 and med.shape == (6,)
    direct = _direct_geometric_median(pts)
    obj_med, obj_direct = _sum_dist(pts, med), _sum_dist(pts, direct)
    assert obj_med <= obj_direct * (1 + 1e-6) + 1e-6
    assert (med.double() - direct).norm() < 1e-2
    mean = pts.double().mean(0)
    # the mean is dragged ~23 units towards the outliers; the median stays with the bulk
    assert (med.double() - mean).norm() > 10 * (med.double() - direct).norm() + 5.0
    assert med.double().norm() < (mean.norm() / 2)


def test_geometric_median_of_collinear_points_is_the_median():
    # on a line the geometric median is the ordinary median (odd count -> the middle point)
    t = torch.tensor([-3.0, -1.0, 0.5, 2.0, 40.0, 41.0, 45.0, 1.0, 0.0])
    direction = torch.tensor([1.0, 2.0, -2.0]) / 3
    pts = t[:, None] * direction + torch.tensor([5.0, -1.0, 2.0])
    med = geometric_median(pts)
    expected = t.median() * direction + torch.tensor([5.0, -1.0, 2.0])
    assert _sum_dist(pts, med) <= _sum_dist(pts, expected) * (1 + 1e-6)
    assert torch.allclose(med, expected, atol=1e-2)


def test_init_from_sample_scale_and_b_dec():
    x = _data(n=1000, d=16, seed=5) * 7.0
    sae = SAE(SAEConfig(d_model=16, d_sae=32))
    sae.init_from_sample(x)
    s = sae.input_scale.item()
    e = (s * x.double()).pow(2).sum(1).mean().item()
    assert e == pytest.approx(16.0, rel=1e-5)

    xs = (x.double() * s).float()
    direct = _direct_geometric_median(xs)
    b = sae.b_dec.detach()
    assert _sum_dist(xs, b) <= _sum_dist(xs, direct) * (1 + 1e-6) + 1e-6
    # and it is not simply the mean of the scaled sample
    assert (b.double() - xs.double().mean(0)).norm() > 10 * (b.double() - direct).norm()


# ---- ghost grads -------------------------------------------------------------------------------------------

def _relu_sae(seed=0, d_model=8, d_sae=16, **kw):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=d_model, d_sae=d_sae, **kw))
    x = _data(n=256, d=d_model, seed=seed)
    sae.init_from_sample(x)
    return sae, x


def _dead_mask(d_sae, dead):
    m = torch.zeros(d_sae, dtype=torch.bool)
    m[list(dead)] = True
    return m


def test_ghost_grads_reach_only_dead_latents():
    sae, x = _relu_sae()
    dead = _dead_mask(16, [0, 3, 9, 15])
    live = ~dead
    xs = x * sae.input_scale
    f = sae.activate(sae.pre_acts(x))
    err = sae.decode_scaled(f) - xs
    mse = err.pow(2).mean()
    ghost = sae._ghost_loss(x, err, mse, dead)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    gW_enc, gb_enc, gW_dec, gb_dec = torch.autograd.grad(ghost, params, allow_unused=True)
    assert torch.count_nonzero(gW_enc[:, live]) == 0
    assert torch.count_nonzero(gb_enc[live]) == 0
    assert torch.count_nonzero(gW_dec[live]) == 0
    assert gb_dec is None or torch.count_nonzero(gb_dec) == 0
    for j in torch.nonzero(dead).flatten():
        assert gW_enc[:, j].abs().sum() > 0
        assert gb_enc[j].abs() > 0
        assert gW_dec[j].abs().sum() > 0


def test_ghost_term_through_loss_only_for_dead_and_only_when_any_dead():
    sae, x = _relu_sae(seed=1)
    dead = _dead_mask(16, [2, 5])

    loss_none, parts_none = sae.loss(x, None)
    loss_zero, parts_zero = sae.loss(x, torch.zeros(16, dtype=torch.bool))
    assert "ghost" not in parts_none and "ghost" not in parts_zero
    assert loss_zero.item() == loss_none.item()

    loss_dead, parts_dead = sae.loss(x, dead)
    assert "ghost" in parts_dead
    assert (loss_dead - loss_none).item() == pytest.approx(parts_dead["ghost"].item(), rel=1e-5)
    # the ghost term is rescaled to the size of the MSE
    assert parts_dead["ghost"].item() == pytest.approx(parts_dead["mse"].item(), rel=1e-3)

    params = [sae.W_enc, sae.b_enc, sae.W_dec]
    g_dead = torch.autograd.grad(loss_dead, params)
    g_none = torch.autograd.grad(sae.loss(x, None)[0], params)
    diff_enc, diff_benc, diff_dec = (a - b for a, b in zip(g_dead, g_none))
    live = ~dead
    tol = 1e-6 * max(g.abs().max().item() for g in g_none)
    assert diff_enc[:, live].abs().max() <= tol
    assert diff_benc[live].abs().max() <= tol
    assert diff_dec[live].abs().max() <= tol
    assert diff_enc[:, dead].abs().amax(0).min() > 100 * tol
    assert diff_dec[dead].abs().amax(1).min() > 100 * tol

    # disabled ghost grads: nothing added even with dead latents
    sae_off = SAE(SAEConfig(d_model=8, d_sae=16, ghost_grads=False))
    sae_off.load_state_dict(sae.state_dict())
    loss_off, parts_off = sae_off.loss(x, dead)
    assert "ghost" not in parts_off and loss_off.item() == loss_none.item()


# ---- TopK / AuxK -------------------------------------------------------------------------------------------

def test_topk_keeps_exactly_k_largest_when_preacts_positive():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=8, d_sae=32, arch="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # all pre-activations positive
    x = torch.randn(64, 8)
    pre = sae.pre_acts(x).detach()
    assert (pre > 0).all()
    f = sae.encode(x).detach()
    assert ((f != 0).sum(-1) == 5).all()
    for i in range(len(x)):
        kept = set(torch.nonzero(f[i]).flatten().tolist())
        order = torch.argsort(pre[i], descending=True).tolist()
        assert kept == set(order[:5])
        assert torch.equal(f[i, list(kept)], pre[i, list(kept)])


def test_topk_with_relu_keeps_at_most_k():
    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_model=8, d_sae=32, arch="topk", k=6))
    with torch.no_grad():
        sae.b_enc.fill_(-1000.0)
        sae.b_enc[[3, 7, 11]] = 1000.0  # only three latents can be positive
    x = torch.randn(32, 8)
    f = sae.encode(x).detach()
    nz = (f != 0).sum(-1)
    assert (nz <= 6).all() and (nz == 3).all()
    assert (f >= 0).all()

    # random biases: never more than k, and the kept ones are the largest positive pre-activations
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(32) * 2)
    pre = sae.pre_acts(x).detach()
    f = sae.encode(x).detach()
    for i in range(len(x)):
        n_pos = int((pre[i] > 0).sum())
        assert int((f[i] != 0).sum()) == min(6, n_pos)
        top = torch.topk(pre[i], min(6, n_pos)).values
        assert torch.equal(torch.sort(f[i][f[i] != 0]).values, torch.sort(top).values)


def test_auxk_only_with_dead_latents_and_grads_only_into_dead_encoder_columns():
    torch.manual_seed(2)
    sae = SAE(SAEConfig(d_model=8, d_sae=32, arch="topk", k=4))
    x = _data(n=128, d=8, seed=2)
    sae.init_from_sample(x)
    dead = _dead_mask(32, [1, 4, 20, 31])
    with torch.no_grad():
        sae.b_enc[dead] = 3.0  # so the dead latents have positive pre-activations on most tokens
    live = ~dead

    loss_none, parts_none = sae.loss(x, None)
    loss_zero, parts_zero = sae.loss(x, torch.zeros(32, dtype=torch.bool))
    assert "aux" not in parts_none and "aux" not in parts_zero and "ghost" not in parts_none
    assert loss_zero.item() == loss_none.item()
    loss_dead, parts_dead = sae.loss(x, dead)
    assert "aux" in parts_dead
    assert (loss_dead - loss_none).item() == pytest.approx(sae.cfg.aux_coeff * parts_dead["aux"].item(), rel=1e-4)

    pre = sae.pre_acts(x)
    f = sae.activate(pre)
    err = sae.decode_scaled(f) - x * sae.input_scale
    aux = sae._aux_k_loss(pre, err, dead)
    gW_enc, gb_enc, gW_dec = torch.autograd.grad(aux, [sae.W_enc, sae.b_enc, sae.W_dec])
    assert torch.count_nonzero(gW_enc[:, live]) == 0
    assert torch.count_nonzero(gb_enc[live]) == 0
    assert torch.count_nonzero(gW_dec[live]) == 0
    assert (gW_enc[:, dead].abs().sum(0) > 0).all()
    assert (gW_dec[dead].abs().sum(1) > 0).all()


# ---- the loss formulas -------------------------------------------------------------------------------------

def test_relu_loss_parts_match_hand_computation():
    W_enc = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])  # (d_model=2, d_sae=3)
    b_enc = np.array([0.1, -0.2, 0.05])
    W_dec = np.array([[0.6, 0.8], [1.0, 0.0], [-0.28, 0.96]])  # unit rows
    b_dec = np.array([0.3, -0.1])
    scale = 1.7
    x = np.array([[1.0, 2.0], [-0.5, 0.25], [3.0, -1.0], [0.0, 0.7]])
    lam = 0.05

    sae = SAE(SAEConfig(d_model=2, d_sae=3, l1_coeff=lam))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_enc))
        sae.b_enc.copy_(torch.tensor(b_enc))
        sae.W_dec.copy_(torch.tensor(W_dec))
        sae.b_dec.copy_(torch.tensor(b_dec))
        sae.input_scale.fill_(scale)

    xs = x * scale
    f = np.maximum((xs - b_dec) @ W_enc + b_enc, 0)
    assert (f > 0).any() and (f == 0).any()  # the ReLU matters in this example
    xhat = f @ W_dec + b_dec
    mse = ((xhat - xs) ** 2).mean()
    l1 = np.abs(f).sum(1).mean()
    l0 = (f > 0).sum(1).mean()

    xt = torch.tensor(x, dtype=torch.float32)
    loss, parts = sae.loss(xt, None)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert parts["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert parts["l0"].item() == pytest.approx(l0)
    assert loss.item() == pytest.approx(mse + lam * l1, rel=1e-5)
    assert parts["fired_S"].tolist() == (f > 0).any(0).tolist()

    xhat_raw, f_t = sae(xt)
    np.testing.assert_allclose(f_t.detach().numpy(), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xhat_raw.detach().numpy(), xhat / scale, rtol=1e-5, atol=1e-6)


def test_topk_loss_has_no_l1():
    sae = SAE(SAEConfig(d_model=4, d_sae=8, arch="topk", k=2))
    x = torch.randn(10, 4)
    loss, parts = sae.loss(x, None)
    assert "l1" not in parts
    assert loss.item() == pytest.approx(parts["mse"].item(), rel=1e-6)


# ---- config validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(arch="gated"), dict(arch="TopK"), dict(arch="topk", k=0),
                                dict(arch="topk", k=-3), dict(arch="topk", k=65)])
def test_sae_config_rejects_bad_settings(kw):
    with pytest.raises(PatchSAEError):
        SAEConfig(d_model=16, d_sae=64, **kw)


def test_sae_config_accepts_edge_k():
    assert SAEConfig(d_model=16, d_sae=64, arch="topk", k=64).k == 64
    assert SAEConfig(d_model=16, d_sae=64, arch="topk", k=1).k == 1


@pytest.mark.parametrize("with_dead", [False, True])
def test_fused_relu_loss_gradients_equal_autograd_of_the_formula(with_dead):
    """The ReLU loss has a hand-written backward (no (tokens x d_sae) GEMM for b_dec); its gradients must be
    autograd's gradients of mse + lambda * L1 (+ ghost term) written out plainly, in float64."""
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_model=8, d_sae=24, l1_coeff=0.07)).double()
    x = _data(n=96, d=8, seed=3).double()
    sae.init_from_sample(x)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.3)
    dead = _dead_mask(24, [1, 7, 20]) if with_dead else None
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    loss, parts = sae.loss(x, dead)
    got = torch.autograd.grad(loss, params)

    xs = x * sae.input_scale
    f = torch.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    err = f @ sae.W_dec + sae.b_dec - xs
    mse = err.pow(2).mean()
    ref = mse + 0.07 * f.sum(-1).mean()
    if with_dead:
        ref = ref + sae._ghost_loss(x, err, mse, dead)
    want = torch.autograd.grad(ref, params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert (f == 0).any() and (f > 0).any()
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)
    assert parts["l0"].item() == pytest.approx((f > 0).sum(-1).double().mean().item())
    assert parts["fired_S"].tolist() == (f > 0).any(0).tolist()


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_relu_path_equals_dense_relu_path(monkeypatch, with_dead):
    """Training switches to the sparse ReLU path when few (token, latent) pairs fire; both paths must give the
    same loss, parts and gradients (float64)."""
    from patchsae.sae import relu as M  # the ReLU variant reads its sparse-path threshold there

    torch.manual_seed(4)
    sae = SAE(SAEConfig(d_model=8, d_sae=48, l1_coeff=0.05)).double()
    x = _data(n=80, d=8, seed=4).double()
    sae.init_from_sample(x)
    with torch.no_grad():
        sae.b_enc.fill_(-0.8)  # sparse codes, as in a trained SAE; some tokens with no active latent
    dead = _dead_mask(48, [0, 5, 33]) if with_dead else None
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    out = {}
    for name, density in (("dense", 0.0), ("sparse", 1.0)):
        monkeypatch.setattr(M, "RELU_SPARSE_DENSITY", density)
        loss, parts = sae.loss(x, dead)
        out[name] = (loss.detach(), parts, torch.autograd.grad(loss, params))
    (ld, pd, gd), (ls, ps, gs) = out["dense"], out["sparse"]
    f = sae.encode(x).detach()
    assert 0 < (f > 0).double().mean() < 0.3 and ((f > 0).sum(-1) == 0).any()
    assert torch.allclose(ld, ls, rtol=1e-12)
    for key in ("mse", "l1", "l0"):
        assert pd[key].item() == pytest.approx(ps[key].item(), rel=1e-12)
    assert torch.equal(pd["fired_S"], ps["fired_S"])
    for a, b in zip(gd, gs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
