"""Distributed caching and training (torchrun's code path) on CPU with gloo and 2 processes, against one
process: the 2-process cache is the 1-process cache, and 2-process training on the same global batches gives
the same SAE (ReLU with ghost grads, TopK with AuxK), also after a kill and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from patchsae.activations.cache import ActivationCache, build_cache
from patchsae.activations.tokens import CachedTokens
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.dist import Dist
from patchsae.models.load import load_model
from patchsae.sae.model import SAEConfig
from patchsae.sae.train import TrainConfig, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES, SHARD = 64, 16  # 4 shards: rank 0 extracts 0 and 2, rank 1 extracts 1 and 3
# 767 tokens a step (odd, so the ranks' slices differ in size), 3,200 tokens an epoch (its last batch is
# short), 9 steps crossing into the second epoch; dead_steps=0 counts every latent as dead, so the ghost-grad
# and AuxK terms (and their batch statistics reduced across ranks) run at every step
TRAIN = TrainConfig(total_tokens=6_500, batch_tokens=767, lr=3e-3, warmup_steps=2, init_tokens=2_000,
                    checkpoint_every=4, log_every=1)
ARCHS = {"relu": dict(arch="relu", l1_coeff=0.3, dead_steps=0), "topk": dict(arch="topk", k=4, dead_steps=0)}


class Dying:
    """A token source that raises after `fail_after` batches, like a killed job (every rank at one step)."""

    def __init__(self, src, fail_after):
        self.src, self.fail_after, self.n_tokens = src, fail_after, src.n_tokens

    def sample(self, n):
        return self.src.sample(n)

    def batches(self, batch_size, start_step=0, rank=0, world=1):
        for i, b in enumerate(self.src.batches(batch_size, start_step, rank, world)):
            if i == self.fail_after:
                raise KeyboardInterrupt("simulated kill")
            yield b


def _sae_cfg(d_model, arch):
    return SAEConfig(d_model=d_model, d_sae=4 * d_model, **ARCHS[arch])


def _everything(dist: Dist, clip_dir: str, root: str) -> None:
    """What each rank does: extract the cache, train each architecture, and kill + resume one run."""
    model = load_model(clip_dir)
    build_cache(model, FashionMNIST("test"), -2, f"{root}/cache2", batch_size=16, shard_images=SHARD,
                max_images=N_IMAGES, progress=False, dist=dist)
    src = CachedTokens(ActivationCache(f"{root}/cache2"), "all", seed=1)
    for arch in ARCHS:
        sae = train_sae(_sae_cfg(model.d_model, arch), TRAIN, src, f"{root}/sae2_{arch}", progress=False, dist=dist)
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, f"{root}/rank{dist.rank}_{arch}.safetensors")
    try:
        train_sae(_sae_cfg(model.d_model, "topk"), TRAIN, Dying(src, 6), f"{root}/sae2_killed", progress=False, dist=dist)
    except KeyboardInterrupt:
        pass
    train_sae(_sae_cfg(model.d_model, "topk"), TRAIN, src, f"{root}/sae2_killed", progress=False, dist=dist)


def _worker(rank: int, world: int, clip_dir: str, root: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        _everything(Dist(rank=rank, world=world), clip_dir, root)
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tiny_clip_dir, tmp_path_factory):
    """The 2-process run (spawned), and the same cache and trainings in this process."""
    root = tmp_path_factory.mktemp("dist")
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers, 10+ s)
    mp.start_processes(_worker, args=(2, str(tiny_clip_dir), str(root)), nprocs=2, join=True, start_method="fork")
    model = load_model(str(tiny_clip_dir))
    build_cache(model, FashionMNIST("test"), -2, root / "cache1", batch_size=16, shard_images=SHARD,
                max_images=N_IMAGES, progress=False)
    src = CachedTokens(ActivationCache(root / "cache1"), "all", seed=1)
    for arch in ARCHS:
        train_sae(_sae_cfg(model.d_model, arch), TRAIN, src, root / f"sae1_{arch}", progress=False)
    return root


def test_two_process_cache_equals_one_process_cache(runs):
    m1 = json.loads((runs / "cache1" / "manifest.json").read_text())
    m2 = json.loads((runs / "cache2" / "manifest.json").read_text())
    assert m1 == m2 and m1["n_images"] == N_IMAGES and len(m1["shards"]) == 4
    a, b = ActivationCache(runs / "cache1"), ActivationCache(runs / "cache2")
    assert np.array_equal(a.images(0, N_IMAGES), b.images(0, N_IMAGES))
    assert np.array_equal(a.index, b.index) and a.index[:, 0].tolist() == list(range(N_IMAGES))
    assert sorted(p.name for p in (runs / "cache2").iterdir()) == sorted(p.name for p in (runs / "cache1").iterdir())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_process_training_equals_one_process(runs, arch):
    one = load_file(str(runs / f"sae1_{arch}" / "model.safetensors"))
    two = load_file(str(runs / f"sae2_{arch}" / "model.safetensors"))
    ranks = [load_file(str(runs / f"rank{r}_{arch}.safetensors")) for r in (0, 1)]
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks disagree on {k}"
        assert torch.equal(ranks[0][k], two[k])
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), (k, (one[k] - two[k]).abs().max())
    log = (runs / f"sae2_{arch}" / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + TRAIN.total_steps and log[0].endswith(",dead_fraction")
    assert all(float(r.split(",")[-1]) == 1.0 for r in log[1:])  # ghost grads / AuxK ran at every step
    assert log == (runs / f"sae1_{arch}" / "train_log.csv").read_text().splitlines() or _close_logs(
        runs / f"sae1_{arch}", runs / f"sae2_{arch}")
    dec = two["W_dec"].norm(dim=1)
    assert torch.allclose(dec, torch.ones_like(dec), atol=1e-5)


def _close_logs(a, b) -> bool:
    rows = [np.loadtxt(d / "train_log.csv", delimiter=",", skiprows=1) for d in (a, b)]
    return rows[0].shape == rows[1].shape and np.allclose(rows[0], rows[1], rtol=1e-4, atol=1e-6)


def test_killed_two_process_run_resumes_to_the_same_weights(runs):
    one = load_file(str(runs / "sae1_topk" / "model.safetensors"))
    resumed = load_file(str(runs / "sae2_killed" / "model.safetensors"))
    for k in one:
        assert torch.allclose(one[k], resumed[k], rtol=1e-4, atol=1e-5), k
    assert json.loads((runs / "sae2_killed" / "config.json").read_text())["tokens_trained"] == 9 * 767


def test_stages_that_are_not_distributed_refuse_torchrun(monkeypatch, tmp_path, capsys):
    from patchsae import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["quickstart", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun" in err and "`quickstart`" in err
    assert not (tmp_path / "run").exists()
