"""Extract once, train many times: a block's residual stream at every token, cached on disk.

On-disk format (version "patchsae-activations/1"), one folder per (model, layer, dataset, split); several blocks
extracted together (`build_caches`) give one such folder each, from one forward pass per image:
  manifest.json            written last, atomically: model, layer, d_model, dataset, split, class_names,
                           token layout (kind of every token row), dtype, shards, image count, skipped images,
                           the forward's precision ("extract_dtype": fp32, bf16 or fp16; absent = fp32)
  shard_NNNNN.npy          float16 array (images, tokens, d_model), NumPy .npy, memory-mappable
  shard_NNNNN.index.npy    int64 array (images, 2): dataset index and label of each row
  progress.json            while extraction runs: what is being extracted (shard size, image count)
  shard_NNNNN.done.json    while extraction runs: shard NNNNN is complete (its image count, skipped images)
Shard NNNNN holds images NNNNN x shard_images ... of the dataset (minus unreadable ones). Shards are written
through a memory map under a temporary name, renamed, then marked done, so a killed run redoes only the
shards not yet marked done. Under torchrun, rank r extracts shards r, r + world, ... and rank 0 writes the manifest
once every rank is done: the cache is the same file for file as a one-process extraction.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import numpy as np
import torch

from patchsae import PatchSAEError
from patchsae.activations.precision import autocast, check_dtype
from patchsae.data.base import LabelledImages, SkipLog, check_not_empty, iter_batches
from patchsae.dist import Dist
from patchsae.models.clip import ClipModel
from patchsae.utils import atomic_path, one_line, read_json, read_json_file, write_json

FORMAT = "patchsae-activations/1"
SHARD_NAME = re.compile(r"shard_[0-9]{5}(\.index)?\.npy")  # names only: a manifest never points outside


IDENTITY_DEFAULTS = {"extract_dtype": "fp32"}  # what a manifest written before the key existed holds


def cache_identity(model: ClipModel, ds: LabelledImages, layer: int, max_images: int | None,
                   dtype: str = "fp32") -> dict:
    return {"format": FORMAT, "model": model.name, "layer": model.resolve_layer(layer), "d_model": model.d_model,
            "dataset": ds.name, "split": ds.split, "max_images": max_images, "extract_dtype": check_dtype(dtype)}


def _check_identity(out_dir: Path, manifest: dict, ident: dict) -> dict:
    if {k: manifest.get(k, IDENTITY_DEFAULTS.get(k)) for k in ident} != ident:
        raise PatchSAEError(f"{out_dir} holds a cache of something else ({manifest.get('model')}, layer "
                            f"{manifest.get('layer')}, {manifest.get('dataset')}/{manifest.get('split')}, forward in "
                            f"{manifest.get('extract_dtype', 'fp32')}); use another run directory")
    return manifest


def build_cache(model: ClipModel, ds: LabelledImages, layer: int, out_dir: str | Path, batch_size: int = 256,
                shard_images: int = 4096, max_images: int | None = None, progress: bool = True,
                dist: Dist = Dist(), dtype: str = "fp32", workers: int = 0) -> dict:
    """Write the cache (or finish a killed extraction, or return an existing matching one); return manifest.
    Under torchrun every rank calls it with its `dist` and gets the manifest. `dtype`: the forward's precision
    (activations/precision.py); `workers`: image-decoding processes (data.base.iter_batches)."""
    return build_caches(model, ds, [layer], [out_dir], batch_size, shard_images, max_images, progress, dist, dtype,
                        workers)[0]


def build_caches(model: ClipModel, ds: LabelledImages, layers: list[int], out_dirs: list[str | Path],
                 batch_size: int = 256, shard_images: int = 4096, max_images: int | None = None,
                 progress: bool = True, dist: Dist = Dist(), dtype: str = "fp32", workers: int = 0) -> list[dict]:
    """`build_cache` for several blocks at once, block layers[i] into out_dirs[i]: every image runs once, up to
    the deepest block still missing, and each folder is the same file for file as a one-block cache of its
    block. Folders already complete are checked and kept."""
    out_dirs = [Path(d) for d in out_dirs]
    todo = []
    for layer, out_dir in zip(layers, out_dirs):
        ident = cache_identity(model, ds, layer, max_images, dtype)
        if (out_dir / "manifest.json").exists():
            manifest_file = out_dir / "manifest.json"
            _check_identity(out_dir, _check_manifest(manifest_file, read_json_file(manifest_file, "cache manifest")),
                            ident)
        else:
            todo.append((model.resolve_layer(layer), out_dir, ident))
    if todo:
        _extract(model, ds, todo, batch_size, shard_images, max_images, progress, dist, dtype, workers)
    return [read_json(out_dir / "manifest.json") for out_dir in out_dirs]


def _extract(model: ClipModel, ds: LabelledImages, todo: list, batch_size: int, shard_images: int,
             max_images: int | None, progress: bool, dist: Dist, dtype: str = "fp32", workers: int = 0) -> None:
    """Extract every (block, folder, identity) of `todo`, resuming each folder's done shards; then manifests."""
    check_not_empty(ds)
    n_total = min(len(ds), max_images) if max_images else len(ds)
    for _, out_dir, ident in todo:
        plan = {**ident, "shard_images": shard_images, "n_total": n_total}
        progress_file = out_dir / "progress.json"
        if progress_file.exists() and read_json_file(progress_file, "extraction record") != plan:
            raise PatchSAEError(f"{progress_file} belongs to another extraction; delete {out_dir} to start again")
        dist.barrier()  # every rank has checked the plan before rank 0 may write it
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json(progress_file, plan)

    n_shards = -(-n_total // shard_images)
    for k in range(dist.rank, n_shards, dist.world):
        missing = [(layer, out_dir) for layer, out_dir, _ in todo
                   if not (out_dir / f"shard_{k:05d}.done.json").exists()]
        if missing:
            _extract_shard(model, ds, missing, k, range(k * shard_images, min((k + 1) * shard_images, n_total)),
                           batch_size, f"cache {ds.split} shard {k + 1}/{n_shards}" if progress and dist.is_main else None,
                           dtype, workers)
    dist.barrier()
    if dist.is_main:
        for _, out_dir, ident in todo:
            _write_manifest(model, ds, ident, out_dir, n_shards)
    dist.barrier()


def _extract_shard(model: ClipModel, ds: LabelledImages, targets: list[tuple[int, Path]], k: int, order: range,
                   batch_size: int, desc: str | None, dtype: str = "fp32", workers: int = 0) -> None:
    """Shard k's arrays in each (block, folder) of `targets`, then its done-records (the mark that the shard is
    complete). Activations go straight into memory-mapped files, so memory holds one batch, not the shard (1.2 GB
    at ViT-B/16 x 4,096 images per block)."""
    name, skips, index, n = f"shard_{k:05d}", SkipLog(), [], 0
    layers, finals = [layer for layer, _ in targets], [out_dir / f"{name}.npy" for _, out_dir in targets]
    shape = (len(order), model.layout().n_tokens, model.d_model)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(final)) for final in finals]
        acts = [np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape) for tmp in tmps]
        batches = iter_batches(ds, model.preprocess, batch_size, order, skips, desc, workers=workers,
                               pin_memory=model.device.type == "cuda")
        for pixels, labels, idx in batches:
            with torch.no_grad(), autocast(dtype, model.device):
                h_LBTD = model.block_outputs(pixels, layers)
            for a, h_BTD in zip(acts, h_LBTD):
                if not torch.isfinite(h_BTD).all():
                    raise PatchSAEError(f"non-finite activations for images {idx[:5].tolist()}... of {ds.name}")
                a[n: n + len(h_BTD)] = h_BTD.to(torch.float16).cpu().numpy()
            index.append(np.stack([idx.numpy(), labels.numpy()], 1))
            n += len(labels)
        for a in acts:
            a.flush()
        del a, acts  # the memory maps must be closed before their files are renamed
    for (_, out_dir), final in zip(targets, finals):
        if n < len(order):  # unreadable images were skipped: keep only the rows written
            if n:
                _save_npy(final, np.array(np.load(final, mmap_mode="r")[:n]))
            else:
                final.unlink()
        if n:
            _save_npy(out_dir / f"{name}.index.npy", np.concatenate(index).astype(np.int64))
        write_json(out_dir / f"{name}.done.json", {"n_images": n, "skipped": [[i, r] for i, r in skips.skipped]})


def _write_manifest(model: ClipModel, ds: LabelledImages, ident: dict, out_dir: Path, n_shards: int) -> None:
    """The manifest from the done-records of all shards, in shard order; then the records are removed."""
    shards, skipped = [], []
    for k in range(n_shards):
        done = read_json_file(out_dir / f"shard_{k:05d}.done.json", "shard record")
        skipped += done["skipped"]
        if done["n_images"]:
            shards.append({"file": f"shard_{k:05d}.npy", "index_file": f"shard_{k:05d}.index.npy",
                           "n_images": done["n_images"]})
    n_images = sum(s["n_images"] for s in shards)
    if n_images == 0:
        raise PatchSAEError(f"no readable images in {ds.name} split {ds.split} ({len(skipped)} skipped)")
    if skipped:
        print(f"warning: {len(skipped)} unreadable image(s) skipped while caching", file=sys.stderr)
    layout = model.layout()
    write_json(out_dir / "manifest.json", {
        **ident, "class_names": list(ds.class_names), "layout": layout.to_json(),
        "n_tokens_per_image": layout.n_tokens, "dtype": "float16", "n_images": n_images, "shards": shards,
        "skipped": skipped})
    (out_dir / "progress.json").unlink()
    for k in range(n_shards):
        (out_dir / f"shard_{k:05d}.done.json").unlink()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.save(f, arr)


def _check_manifest(mf: Path, m) -> dict:
    """The manifest, if every field the readers use has its type; else one error line naming the file."""
    def bad(what: str) -> PatchSAEError:
        return PatchSAEError(f"{mf}: damaged cache manifest ({what}); run the cache stage again in a new folder")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT:
        raise PatchSAEError(f"{mf}: unknown cache format {str(m.get('format'))[:40]!r}")
    for key in ("d_model", "n_tokens_per_image", "n_images"):
        if not isinstance(m.get(key), int) or isinstance(m.get(key), bool) or m[key] < 1:
            raise bad(f"{key} must be a positive integer")
    if m.get("dtype") != "float16":
        raise bad(f"dtype {str(m.get('dtype'))[:20]!r}, expected 'float16'")
    kinds = m.get("layout", {}).get("kinds") if isinstance(m.get("layout"), dict) else None
    if not isinstance(kinds, list) or len(kinds) != m["n_tokens_per_image"] or not all(
            k in ("cls", "prompt", "register", "patch") for k in kinds):
        raise bad("layout kinds do not list one of cls/prompt/register/patch per token")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("index_file"), str)
            and isinstance(s.get("n_images"), int) and not isinstance(s["n_images"], bool) and s["n_images"] > 0
            and SHARD_NAME.fullmatch(s["file"]) and SHARD_NAME.fullmatch(s["index_file"]) for s in shards):
        raise bad("shards must list shard_NNNNN.npy files with positive image counts")
    if sum(s["n_images"] for s in shards) != m["n_images"]:
        raise bad("the shards' image counts do not add up to n_images")
    if not isinstance(m.get("class_names"), list):
        raise bad("class_names must be a list")
    return m


def _open_shard(folder: Path, s: dict, m: dict) -> tuple[np.ndarray, np.ndarray]:
    """(memory-mapped activations, index) of one shard, checked against the manifest's shapes and dtypes."""
    want = (s["n_images"], m["n_tokens_per_image"], m["d_model"])
    try:
        acts = np.load(folder / s["file"], mmap_mode="r", allow_pickle=False)
        index = np.load(folder / s["index_file"], allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - NumPy's header parser fails in many ways (even SyntaxError)
        raise PatchSAEError(f"{folder}: unreadable shard {s['file']} ({one_line(exc)}); "
                            "run the cache stage again in a new folder") from None
    if acts.shape != want or acts.dtype != np.float16:
        raise PatchSAEError(f"{folder / s['file']}: holds {acts.dtype} {acts.shape}, the manifest says float16 {want}")
    if index.shape != (want[0], 2) or index.dtype != np.int64:
        raise PatchSAEError(f"{folder / s['index_file']}: holds {index.dtype} {index.shape}, expected int64 "
                            f"({want[0]}, 2)")
    return acts, index


class ActivationCache:
    """Read side of the cache: memory-mapped shards, image rows addressed globally."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        mf = self.folder / "manifest.json"
        if not mf.exists():
            hint = " (extraction was interrupted; run the cache stage again to finish it)" \
                if (self.folder / "progress.json").exists() else ""
            raise PatchSAEError(f"no activation cache in {self.folder}{hint}")
        self.manifest = _check_manifest(mf, read_json_file(mf, "cache manifest"))
        self.shards, index = [], []
        for s in self.manifest["shards"]:
            acts, idx = _open_shard(self.folder, s, self.manifest)
            self.shards.append(acts)
            index.append(idx)
        self.index = np.concatenate(index)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.kinds = self.manifest["layout"]["kinds"]

    @property
    def n_images(self) -> int:
        return int(self.starts[-1])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def rows(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Gather (row, token-position) pairs into an (n, d_model) float16 array."""
        out = np.empty((len(rows), self.d_model), dtype=np.float16)
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = self.shards[s][rows[sel] - self.starts[s], positions[sel]]
        return out

    def images(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as (images, tokens, d_model) float16."""
        parts, r = [], start
        while r < stop:
            s = int(np.searchsorted(self.starts, r, side="right") - 1)
            end = min(stop, int(self.starts[s + 1]))
            parts.append(np.asarray(self.shards[s][r - self.starts[s]: end - self.starts[s]]))
            r = end
        return np.concatenate(parts)
