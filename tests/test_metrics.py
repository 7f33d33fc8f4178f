"""ReconstructionStats, streamed over batches, against a direct float64 numpy computation on all tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchsae.sae.metrics import ReconstructionStats


def _batches(seed=0, sizes=(3, 5, 1, 7), T=6, D=10, S=24):
    rng = np.random.default_rng(seed)
    offset_D = rng.normal(0, 30, size=D)  # a large per-dimension mean: EV must use the mean vector
    out = []
    for B in sizes:
        x = (rng.normal(size=(B, T, D)) * rng.uniform(0.5, 3, size=D) + offset_D).astype(np.float32)
        xhat = (x + rng.normal(scale=0.7, size=x.shape)).astype(np.float32)
        f = np.maximum(rng.normal(size=(B, T, S)) - 1.0, 0).astype(np.float32)
        f[..., :4] = 0.0  # latents 0-3 never fire
        f[..., 4:7] = rng.uniform(0.1, 1.0, size=(B, T, 3))  # 4-6 fire on every token (dense)
        f[..., 7] = 0.0
        if B == 5:
            f[1, 2, 7] = 0.5  # latent 7 fires on exactly one token of all
        out.append((x, xhat, f))
    return out


def _reference(batches, dense_threshold):
    x = np.concatenate([b[0].astype(np.float64).reshape(-1, b[0].shape[-1]) for b in batches])
    xhat = np.concatenate([b[1].astype(np.float64).reshape(-1, b[1].shape[-1]) for b in batches])
    f = np.concatenate([b[2].reshape(-1, b[2].shape[-1]) for b in batches])
    n, d = x.shape
    err = ((x - xhat) ** 2).sum()
    sst = ((x - x.mean(0)) ** 2).sum()
    freq = (f > 0).mean(0)
    per_image = [(b[2][i] > 0).any(0).sum() for b in batches for i in range(len(b[2]))]
    return {
        "mse": err / (n * d),
        "explained_variance": 1 - err / sst,
        "l0_per_token": (f > 0).sum(1).mean(),
        "l0_per_image": float(np.mean(per_image)),
        "dead_fraction": (freq == 0).mean(),
        "dense_fraction": (freq > dense_threshold).mean(),
        "n_tokens": n,
        "n_images": len(per_image),
        "freq": freq,
    }


@pytest.mark.parametrize("dense_threshold", [0.1, 0.5])
def test_reconstruction_stats_match_direct_computation(dense_threshold):
    batches = _batches()
    stats = ReconstructionStats(10, 24, dense_threshold=dense_threshold)
    for x, xhat, f in batches:
        stats.update(torch.from_numpy(x), torch.from_numpy(xhat), torch.from_numpy(f))
    got = stats.result()
    ref = _reference(batches, dense_threshold)

    for key in ("mse", "explained_variance", "l0_per_token", "l0_per_image", "dead_fraction", "dense_fraction"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert got["n_tokens"] == ref["n_tokens"] and got["n_images"] == ref["n_images"]
    assert got["dense_threshold"] == dense_threshold
    np.testing.assert_allclose(stats.frequencies().numpy(), ref["freq"], rtol=1e-12)
    # the data were built to exercise each quantity: 4 dead latents out of 24, the rare latent 7 alive
    assert ref["dead_fraction"] == pytest.approx(4 / 24)
    assert ref["dense_fraction"] >= 3 / 24
    # EV with a scalar mean (or without centring) would be very different here
    x = np.concatenate([b[0].reshape(-1, 10) for b in batches]).astype(np.float64)
    xhat = np.concatenate([b[1].reshape(-1, 10) for b in batches]).astype(np.float64)
    ev_scalar_mean = 1 - ((x - xhat) ** 2).sum() / ((x - x.mean()) ** 2).sum()
    assert abs(ev_scalar_mean - got["explained_variance"]) > 0.05


def test_batching_does_not_change_the_result():
    batches = _batches(seed=1)
    one = ReconstructionStats(10, 24)
    cat = [np.concatenate([b[i] for b in batches]) for i in range(3)]
    one.update(*(torch.from_numpy(a) for a in cat))
    many = ReconstructionStats(10, 24)
    for x, xhat, f in batches:
        many.update(torch.from_numpy(x), torch.from_numpy(xhat), torch.from_numpy(f))
    r1, r2 = one.result(), many.result()
    for key in ("mse", "explained_variance", "l0_per_token", "l0_per_image", "dead_fraction", "dense_fraction"):
        assert r1[key] == pytest.approx(r2[key], rel=1e-9), key


def test_perfect_reconstruction_and_constant_input():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5, 6)).astype(np.float32)
    f = np.abs(rng.normal(size=(4, 5, 8))).astype(np.float32)
    s = ReconstructionStats(6, 8)
    s.update(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(f))
    r = s.result()
    assert r["mse"] == 0 and r["explained_variance"] == pytest.approx(1.0)
    assert r["l0_per_token"] == 8 and r["l0_per_image"] == 8 and r["dead_fraction"] == 0

    # constant activations have no variance: EV is undefined, not a division error
    c = np.ones((2, 3, 6), dtype=np.float32)
    s = ReconstructionStats(6, 8)
    s.update(torch.from_numpy(c), torch.from_numpy(c * 0.5), torch.from_numpy(np.zeros((2, 3, 8), np.float32)))
    r = s.result()
    assert np.isnan(r["explained_variance"]) or r["explained_variance"] is None
    assert r["dead_fraction"] == 1.0 and r["l0_per_token"] == 0


# ---- Table 2's metrics ----------------------------------------------------------------------------------------

def test_table2_functions_against_numpy_and_the_streamed_stats():
    from patchsae.sae.metrics import (explained_variance, explained_variance_uncentred, l0, l1, normalized_mse)

    batches = _batches(seed=4)
    x = np.concatenate([b[0].reshape(-1, 10) for b in batches]).astype(np.float64)
    xhat = np.concatenate([b[1].reshape(-1, 10) for b in batches]).astype(np.float64)
    f = np.concatenate([b[2].reshape(-1, 24) for b in batches]).astype(np.float64)
    f[::3, 8] = -0.5  # a negative activation: L1 counts its size, L0 (f > 0, the reference's) does not
    want = {
        "normalized_mse": np.mean((xhat - x) ** 2 / np.sqrt((x ** 2).sum(1, keepdims=True))),
        "l1": np.abs(f).sum(1).mean(),
        "l0": (f > 0).sum(1).mean(),
        "explained_variance": 1 - ((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "explained_variance_uncentred": 1 - ((x - xhat) ** 2).sum(1).mean() / (x ** 2).sum(1).mean(),
    }
    # the per-dimension offsets make the uncentred EV much higher: the two must not be confused
    assert want["explained_variance_uncentred"] > want["explained_variance"] + 0.05
    tx, txhat, tf = (torch.from_numpy(a).reshape(-1, 6, a.shape[1]) for a in (x, xhat, f))  # (images, T, dim)
    got = {"normalized_mse": normalized_mse(tx, txhat), "l1": l1(tf), "l0": l0(tf),
           "explained_variance": explained_variance(tx, txhat),
           "explained_variance_uncentred": explained_variance_uncentred(tx, txhat)}
    stats = ReconstructionStats(10, 24)
    start = 0
    for b in batches:  # streamed in the original batches
        n = b[0].shape[0] * b[0].shape[1]
        stats.update(tx.reshape(-1, 10)[start:start + n].reshape(b[0].shape), txhat.reshape(-1, 10)[start:start + n],
                     tf.reshape(-1, 24)[start:start + n])
        start += n
    streamed = stats.table2()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
        assert streamed[key] == pytest.approx(value, rel=1e-9), key
