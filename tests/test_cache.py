"""Activation cache: format, round trip against the model, resume after a kill, refusal of foreign caches;
token batch sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patchsae import PatchSAEError
from patchsae.activations.cache import FORMAT, ActivationCache, build_cache
from patchsae.activations.tokens import CachedTokens, StreamedTokens
from patchsae.data.fashion_mnist import FashionMNIST
from patchsae.models.clip import ClipModel
from patchsae.models.load import load_model

N_IMAGES, SHARD, BATCH = 300, 128, 64


pytestmark = pytest.mark.usefixtures("one_thread")
CDIST = "donot_use_mm_for_euclid_dist"  # exact distances: the mm path has errors of ~1e-3


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def fm_test():
    return FashionMNIST("test")


class Wrapped:
    """A dataset wrapper that records loads and can be told to die (like a killed process) at one index."""

    def __init__(self, ds, kill_at=None):
        self.ds, self.kill_at, self.loaded = ds, kill_at, []
        self.name, self.split, self.class_names = "wrapped-fm", ds.split, ds.class_names

    def __len__(self):
        return len(self.ds)

    def load(self, i):
        if self.kill_at is not None and i == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        self.loaded.append(i)
        return self.ds.load(i)


@pytest.fixture(scope="module")
def built(tiny, fm_test, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    manifest = build_cache(tiny, fm_test, -2, out, batch_size=BATCH, shard_images=SHARD, max_images=N_IMAGES,
                           progress=False)
    return out, manifest


def test_manifest(built, tiny, fm_test):
    out, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == FORMAT
    assert manifest["layer"] == tiny.n_layers - 2
    assert manifest["d_model"] == tiny.d_model
    assert manifest["n_images"] == N_IMAGES
    side = 28 // 4
    assert manifest["layout"]["kinds"] == ["cls"] + ["patch"] * side * side
    assert manifest["n_tokens_per_image"] == 1 + side * side
    assert manifest["class_names"] == list(fm_test.class_names)
    assert [s["n_images"] for s in manifest["shards"]] == [128, 128, 44]
    for s in manifest["shards"]:
        arr = np.load(out / s["file"], mmap_mode="r")
        assert arr.dtype == np.float16 and arr.shape == (s["n_images"], 1 + side * side, tiny.d_model)
    assert not (out / "progress.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cache_round_trip_matches_model(built, tiny, fm_test):
    out, _ = built
    cache = ActivationCache(out)
    assert cache.n_images == N_IMAGES and cache.d_model == tiny.d_model
    pixels = tiny.preprocess([fm_test.load(i)[0] for i in range(N_IMAGES)])
    ref = tiny.block_output(pixels, -2).numpy()
    got = cache.images(0, N_IMAGES).astype(np.float32)
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= 1e-3 * np.abs(ref) + 1e-5)
    # a range across a shard boundary, and gathered (row, position) pairs
    assert np.array_equal(cache.images(120, 140), cache.images(0, N_IMAGES)[120:140])
    rng = np.random.default_rng(0)
    rows, pos = rng.integers(0, N_IMAGES, 500), rng.integers(0, ref.shape[1], 500)
    assert np.array_equal(cache.rows(rows, pos), cache.images(0, N_IMAGES)[rows, pos])


def test_cache_index(built, fm_test):
    cache = ActivationCache(built[0])
    assert cache.index.shape == (N_IMAGES, 2)
    assert cache.index[:, 0].tolist() == list(range(N_IMAGES))
    assert cache.index[:, 1].tolist() == fm_test.labels[:N_IMAGES].tolist()


def test_existing_cache_is_returned_not_rebuilt(built, tiny, fm_test):
    out, manifest = built
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    wrapped = Wrapped(fm_test)
    wrapped.name = fm_test.name
    again = build_cache(tiny, wrapped, -2, out, batch_size=BATCH, shard_images=SHARD, max_images=N_IMAGES,
                        progress=False)
    assert again == manifest and wrapped.loaded == []
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_foreign_cache_is_refused(built, tiny, fm_test, tiny_clip_dir):
    out, _ = built
    with pytest.raises(PatchSAEError):
        build_cache(tiny, fm_test, 0, out, shard_images=SHARD, max_images=N_IMAGES, progress=False)
    other = ClipModel(tiny.hf, tiny.tokenizer, tiny.preprocess, "another-model", tiny.templates)
    with pytest.raises(PatchSAEError):
        build_cache(other, fm_test, -2, out, shard_images=SHARD, max_images=N_IMAGES, progress=False)
    with pytest.raises(PatchSAEError):
        build_cache(tiny, FashionMNIST("train"), -2, out, shard_images=SHARD, max_images=N_IMAGES,
                    progress=False)


def test_resume_after_kill(tiny, fm_test, tmp_path):
    n = 200
    kw = dict(batch_size=BATCH, shard_images=SHARD, max_images=n, progress=False)
    # uninterrupted reference
    ref_manifest = build_cache(tiny, Wrapped(fm_test), -2, tmp_path / "ref", **kw)

    out = tmp_path / "killed"
    dying = Wrapped(fm_test, kill_at=150)  # inside the second shard
    with pytest.raises(KeyboardInterrupt):
        build_cache(tiny, dying, -2, out, **kw)
    assert not (out / "manifest.json").exists()
    assert (out / "progress.json").exists()
    assert (out / "shard_00000.npy").exists() and not (out / "shard_00001.npy").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(PatchSAEError, match="interrupted"):
        ActivationCache(out)
    first = out / "shard_00000.npy"
    stamp = (first.stat().st_mtime_ns, first.stat().st_ino)

    # a different extraction may not continue this one
    with pytest.raises(PatchSAEError):
        build_cache(tiny, Wrapped(fm_test), 0, out, **kw)

    resumed = Wrapped(fm_test)
    manifest = build_cache(tiny, resumed, -2, out, **kw)
    assert sorted(resumed.loaded) == list(range(SHARD, n)), "only the images of unfinished shards are reloaded"
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp
    assert not (out / "progress.json").exists()
    assert manifest["n_images"] == n == ref_manifest["n_images"]
    assert manifest["shards"] == ref_manifest["shards"]
    a, b = ActivationCache(out), ActivationCache(tmp_path / "ref")
    assert np.array_equal(a.images(0, n), b.images(0, n))
    assert np.array_equal(a.index, b.index)


def test_cache_with_unreadable_images(tiny, fm_test, tmp_path):
    class Broken(Wrapped):
        def load(self, i):
            if i in (3, 130):
                raise OSError("cannot identify image file")
            return super().load(i)

    ds = Broken(fm_test)
    manifest = build_cache(tiny, ds, -2, tmp_path / "c", batch_size=BATCH, shard_images=SHARD, max_images=140,
                           progress=False)
    assert manifest["n_images"] == 138
    assert sorted(i for i, _ in manifest["skipped"]) == [3, 130]
    cache = ActivationCache(tmp_path / "c")
    assert cache.index[:, 0].tolist() == [i for i in range(140) if i not in (3, 130)]
    pixels = tiny.preprocess([fm_test.load(i)[0] for i in (2, 4, 131)])
    ref = tiny.block_output(pixels, -2).numpy()
    got = cache.images(0, cache.n_images)[[2, 3, 129]].astype(np.float32)
    assert np.all(np.abs(got - ref) <= 1e-3 * np.abs(ref) + 1e-5)


# ---- token sources ---------------------------------------------------------------------------------------------
KINDS = ["cls", "prompt"] + ["patch"] * 6
SHARD_SIZES = [5, 4, 3]


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    """A cache written by hand in the documented format, whose token (row, position) has value (row, position)."""
    out = tmp_path_factory.mktemp("fake")
    shards, row = [], 0
    for k, n in enumerate(SHARD_SIZES):
        arr = np.zeros((n, len(KINDS), 2), np.float16)
        arr[..., 0] = np.arange(row, row + n)[:, None]
        arr[..., 1] = np.arange(len(KINDS))[None, :]
        np.save(out / f"shard_{k:05d}.npy", arr)
        np.save(out / f"shard_{k:05d}.index.npy", np.stack([np.arange(row, row + n), np.zeros(n)], 1).astype(np.int64))
        shards.append({"file": f"shard_{k:05d}.npy", "index_file": f"shard_{k:05d}.index.npy", "n_images": n})
        row += n
    manifest = {"format": FORMAT, "model": "fake", "layer": 0, "d_model": 2, "dataset": "fake", "split": "x",
                "max_images": None, "class_names": ["a"],
                "layout": {"n_cls": 1, "n_prompt": 1, "grid": [2, 3], "kinds": KINDS},
                "n_tokens_per_image": len(KINDS), "dtype": "float16", "n_images": row, "shards": shards,
                "skipped": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return ActivationCache(out)


def _ids(batch: torch.Tensor) -> list[tuple[int, int]]:
    assert batch.dtype == torch.float32 and batch.shape[1] == 2
    return [(int(r), int(p)) for r, p in batch.tolist()]


def _expected_tokens(kinds_wanted):
    n_rows = sum(SHARD_SIZES)
    return {(r, p) for r in range(n_rows) for p, k in enumerate(KINDS) if k in kinds_wanted}


@pytest.mark.parametrize("batch_size", [12, 10, 7, 84, 100])
def test_cached_tokens_epoch_covers_each_token_once(fake_cache, batch_size):
    src = CachedTokens(fake_cache, "all", seed=3)
    expected = _expected_tokens({"cls", "patch"})
    assert src.n_tokens == len(expected) == 84
    per_epoch = src.steps_per_epoch(batch_size)
    assert per_epoch == -(-84 // batch_size)
    it = src.batches(batch_size)
    epochs = []
    for _ in range(2):
        batches = [_ids(next(it)) for _ in range(per_epoch)]
        sizes = [len(b) for b in batches]
        assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
        flat = [t for b in batches for t in b]
        assert len(flat) == len(expected) and set(flat) == expected
        epochs.append([frozenset(b) for b in batches])
    if per_epoch > 1:
        assert epochs[0] != epochs[1], "epoch 2 must be shuffled differently"


def test_cached_tokens_start_step_resumes_exactly(fake_cache):
    bs = 10
    fresh = CachedTokens(fake_cache, "all", seed=7).batches(bs)
    ref = [next(fresh) for _ in range(25)]  # crosses two epoch boundaries (9 steps per epoch)
    for s in (0, 1, 8, 9, 17):
        resumed = CachedTokens(fake_cache, "all", seed=7).batches(bs, start_step=s)
        for k in range(s, 25):
            assert torch.equal(next(resumed), ref[k])
    other_seed = CachedTokens(fake_cache, "all", seed=8).batches(bs)
    assert any(not torch.equal(next(other_seed), ref[k]) for k in range(9))


@pytest.mark.parametrize("tokens,kinds", [("patch", {"patch"}), ("cls", {"cls"}), ("all", {"cls", "patch"})])
def test_cached_tokens_token_sets(fake_cache, tokens, kinds):
    src = CachedTokens(fake_cache, tokens, seed=0)
    expected = _expected_tokens(kinds)
    assert src.n_tokens == len(expected)
    it = src.batches(5)
    flat = [t for _ in range(src.steps_per_epoch(5)) for t in _ids(next(it))]
    assert sorted(flat) == sorted(expected)
    assert all(KINDS[p] in kinds for _, p in flat)


def test_cached_tokens_sample_and_errors(fake_cache):
    src = CachedTokens(fake_cache, "patch", seed=0)
    s = _ids(src.sample(20))
    assert len(s) == len(set(s)) == 20 and set(s) <= _expected_tokens({"patch"})
    assert _ids(src.sample(20)) == s  # fixed
    assert len(src.sample(10_000)) == src.n_tokens
    with pytest.raises(PatchSAEError):
        CachedTokens(fake_cache, "prompts-and-more")


def test_cached_tokens_on_real_cache_returns_cached_values(built):
    cache = ActivationCache(built[0])
    src = CachedTokens(cache, "cls", seed=0)
    assert src.n_tokens == N_IMAGES
    it = src.batches(128)
    got = torch.cat([next(it) for _ in range(src.steps_per_epoch(128))])
    want = torch.from_numpy(cache.images(0, N_IMAGES)[:, 0].astype(np.float32))
    # same multiset of rows: sort both by their first coordinate, then the second
    key = lambda t: t[torch.from_numpy(np.lexsort((t[:, 1].numpy(), t[:, 0].numpy())))]  # noqa: E731
    assert torch.equal(key(got), key(want))


class Subset:
    def __init__(self, ds, n):
        self.ds, self.n = ds, n
        self.name, self.split, self.class_names = "subset", ds.split, ds.class_names

    def __len__(self):
        return self.n

    def load(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds.load(i)


@pytest.mark.parametrize("tokens,per_image", [("all", 50), ("patch", 49)])
def test_streamed_tokens_values_and_resume(tiny, fm_test, tokens, per_image):
    ds = Subset(fm_test, 10)  # 10 images, 2 per step of 64 tokens: every step has enough tokens
    src = StreamedTokens(tiny, ds, -2, tokens, seed=0)
    assert src.n_tokens == 10 * per_image
    pixels = tiny.preprocess([ds.load(i)[0] for i in range(10)])
    h = tiny.block_output(pixels, -2)
    pool = (h[:, 1:] if tokens == "patch" else h).reshape(-1, tiny.d_model)
    cls_rows = h[:, 0]
    bs = 64
    it = src.batches(bs)
    seen = []
    for _ in range(7):  # more than one epoch (5 steps)
        batch = next(it)
        assert batch.shape == (bs, tiny.d_model) and batch.dtype == torch.float32
        # every row is one of the model's tokens of this dataset, no row twice in a batch
        d, nearest = torch.cdist(batch, pool, compute_mode=CDIST).min(dim=1)
        assert d.max() < 1e-4
        assert len(set(nearest.tolist())) == bs
        seen += nearest.tolist()
        if tokens == "patch":
            assert torch.cdist(batch, cls_rows, compute_mode=CDIST).min() > 1e-3
    # tokens come from all images of the dataset
    assert {i // per_image for i in seen} == set(range(10))
    resumed = StreamedTokens(tiny, ds, -2, tokens, seed=0).batches(bs, start_step=3)
    again = src.batches(bs)
    for _ in range(3):
        next(again)
    assert torch.allclose(next(resumed), next(again), atol=1e-6)
    sample = src.sample(30)
    assert sample.shape == (30, tiny.d_model)
    assert torch.cdist(sample, pool, compute_mode=CDIST).min(dim=1).values.max() < 1e-4


@pytest.mark.parametrize("n_images", [11, 3])
def test_streamed_tokens_every_batch_has_requested_size(tiny, fm_test, n_images):
    """The trainer asks for batch_tokens per step; the last step of an epoch must not come up short when
    the image count is not a multiple of the images used per step."""
    ds = Subset(fm_test, n_images)
    src = StreamedTokens(tiny, ds, -2, "all", seed=0)
    bs = 64  # 2 images (100 tokens) per step
    it = src.batches(bs)
    sizes = [len(next(it)) for _ in range(2 * -(-n_images // 2))]  # two epochs
    assert sizes == [bs] * len(sizes)


# ---- two-level shuffle (chunks of images, then tokens within a window of chunks) -------------------------------
SMALL = dict(chunk_images=2, window_chunks=2)  # 12 images -> 6 chunks -> 3 windows of 28 tokens


@pytest.mark.parametrize("batch_size", [10, 28, 84])
def test_two_level_shuffle_epochs_resume_and_rank_slices(fake_cache, batch_size):
    src = CachedTokens(fake_cache, "all", seed=5, **SMALL)
    per_epoch = src.steps_per_epoch(batch_size)
    ref = [_ids(b) for b, _ in zip(src.batches(batch_size), range(2 * per_epoch + 1))]
    for e in range(2):
        flat = [t for b in ref[e * per_epoch: (e + 1) * per_epoch] for t in b]
        assert sorted(flat) == sorted(_expected_tokens({"cls", "patch"}))
    assert per_epoch == 1 or ref[:per_epoch] != ref[per_epoch: 2 * per_epoch]
    # a resumed source, and the ranks of a 3-process run, see the same global batches
    for s in (1, per_epoch, per_epoch + 1):
        again = CachedTokens(fake_cache, "all", seed=5, **SMALL).batches(batch_size, start_step=s)
        assert [_ids(next(again)) for _ in range(len(ref) - s)] == ref[s:]
    parts = [CachedTokens(fake_cache, "all", seed=5, **SMALL).batches(batch_size, rank=r, world=3) for r in range(3)]
    for want in ref:
        got = [_ids(next(p)) for p in parts]
        assert max(map(len, got)) - min(map(len, got)) <= 1
        assert sorted(t for g in got for t in g) == sorted(want)


def test_two_level_shuffle_draws_a_batch_from_one_window_of_chunks(fake_cache):
    src = CachedTokens(fake_cache, "all", seed=2, **SMALL)
    it = src.batches(28)  # one window per batch
    chunks_of_epoch = set()
    for _ in range(3):
        chunks = {r // 2 for r, _ in _ids(next(it))}
        assert len(chunks) == 2  # the tokens of two chunks (4 images), all of them
        chunks_of_epoch |= chunks
    assert chunks_of_epoch == set(range(6))
    assert max(len(w) for w in src._windows.values()) == 28  # the largest index array it holds


def test_cached_tokens_never_holds_a_permutation_of_all_tokens(tmp_path):
    """An ImageNet-sized cache (1.3 M images x 197 tokens = 256 M tokens; sparse files, nothing written):
    the first batches need a few MB, where one permutation of all tokens would need 1 GB."""
    import tracemalloc

    n, t = 1_300_000, 197
    np.lib.format.open_memmap(tmp_path / "shard_00000.npy", mode="w+", dtype=np.float16, shape=(n, t, 1)).flush()
    np.lib.format.open_memmap(tmp_path / "shard_00000.index.npy", mode="w+", dtype=np.int64, shape=(n, 2)).flush()
    manifest = {"format": FORMAT, "model": "fake", "layer": 0, "d_model": 1, "dataset": "fake", "split": "x",
                "max_images": None, "class_names": ["a"], "layout": {"n_cls": 1, "n_prompt": 0, "grid": [14, 14],
                "kinds": ["cls"] + ["patch"] * 196}, "n_tokens_per_image": t, "dtype": "float16", "n_images": n,
                "shards": [{"file": "shard_00000.npy", "index_file": "shard_00000.index.npy", "n_images": n}],
                "skipped": []}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    src = CachedTokens(ActivationCache(tmp_path), "all", seed=0)
    assert src.n_tokens == n * t
    tracemalloc.start()
    it = src.batches(4096, start_step=1000)
    for _ in range(3):
        assert next(it).shape == (4096, 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB"


@pytest.mark.parametrize("world", [1, 2])
def test_cached_tokens_with_cls_marks_the_cls_rows(fake_cache, world):
    """with_cls yields the same rows plus cls_N; the fake cache's value (row, position) says which are CLS."""
    for rank in range(world):
        plain = CachedTokens(fake_cache, "all", seed=5).batches(10, rank=rank, world=world)
        marked = CachedTokens(fake_cache, "all", seed=5).batches(10, rank=rank, world=world, with_cls=True)
        for _ in range(12):  # crosses an epoch boundary
            x_ND, cls_N = next(marked)
            assert torch.equal(x_ND, next(plain))
            assert cls_N.dtype == torch.bool and cls_N.tolist() == [KINDS[int(p)] == "cls" for p in x_ND[:, 1]]
    _, cls_N = next(CachedTokens(fake_cache, "patch", seed=5).batches(10, with_cls=True))
    assert not cls_N.any()


def test_streamed_tokens_with_cls_marks_the_cls_rows(tiny, fm_test):
    ds = Subset(fm_test, 6)
    src = StreamedTokens(tiny, ds, -2, "all", seed=0)
    pixels = tiny.preprocess([ds.load(i)[0] for i in range(6)])
    h = tiny.block_output(pixels, -2)
    is_cls = torch.zeros(h.shape[:2], dtype=torch.bool)
    is_cls[:, 0] = True
    pool, pool_cls = h.reshape(-1, tiny.d_model), is_cls.reshape(-1)
    plain, marked = src.batches(64), src.batches(64, with_cls=True)
    for _ in range(4):
        x_ND, cls_N = next(marked)
        assert torch.allclose(x_ND, next(plain), atol=1e-6)
        nearest = torch.cdist(x_ND, pool, compute_mode=CDIST).argmin(dim=1)
        assert cls_N.tolist() == pool_cls[nearest].tolist() and cls_N.any()


@pytest.mark.parametrize("dtype,tol", [("bf16", 1e-2), ("fp16", 2e-3)])
def test_low_precision_extraction_is_within_its_tolerance_of_fp32(built, tiny, fm_test, tmp_path, dtype, tol):
    """--dtype bf16/fp16 runs the forward under autocast (here on CPU, decoding in 2 worker processes): the
    cached activations stay within that precision's relative error of the fp32 extraction's (bf16 keeps 8
    significant bits, fp16 11), are not the fp32 ones (the low precision really ran), and the manifest says
    which forward made them."""
    out, _ = built
    n = 64
    manifest = build_cache(tiny, fm_test, -2, tmp_path, batch_size=BATCH, shard_images=SHARD, max_images=n,
                           progress=False, dtype=dtype, workers=2)
    assert manifest["extract_dtype"] == dtype
    low = np.load(tmp_path / "shard_00000.npy").astype(np.float32)
    ref = np.load(out / "shard_00000.npy")[:n].astype(np.float32)
    rel = np.linalg.norm(low - ref) / np.linalg.norm(ref)
    assert 0 < rel < tol, rel
    assert np.array_equal(np.load(tmp_path / "shard_00000.index.npy"), np.load(out / "shard_00000.index.npy")[:n])


def test_cache_of_another_precision_is_refused_and_old_caches_are_fp32(built, tiny, fm_test, tmp_path):
    out, manifest = built
    assert manifest["extract_dtype"] == "fp32"
    with pytest.raises(PatchSAEError, match="forward in fp32"):
        build_cache(tiny, fm_test, -2, out, shard_images=SHARD, max_images=N_IMAGES, progress=False, dtype="bf16")
    with pytest.raises(PatchSAEError, match="unknown extraction dtype 'fp8'"):
        build_cache(tiny, fm_test, -2, tmp_path / "x", max_images=8, progress=False, dtype="fp8")
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "extract_dtype"}))
    assert build_cache(tiny, fm_test, -2, old, shard_images=SHARD, max_images=N_IMAGES, progress=False)["n_images"] \
        == N_IMAGES  # written before the key existed: an fp32 cache, reused
