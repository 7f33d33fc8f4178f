"""Extract once, train many times: a block's residual stream at every token, cached on disk.

On-disk format (version "patchsae-activations/1"), one folder per (model, layer, dataset, split):
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

import sys
from pathlib import Path

import numpy as np
import torch

from patchsae import PatchSAEError
from patchsae.activations.precision import autocast, check_dtype
from patchsae.data.base import LabelledImages, SkipLog, check_not_empty, iter_batches
from patchsae.dist import Dist
from patchsae.models.clip import ClipModel
from patchsae.utils import atomic_path, read_json, write_json

FORMAT = "patchsae-activations/1"


IDENTITY_DEFAULTS = {"extract_dtype": "fp32"}  # what a manifest written before the key existed holds


def cache_identity(model: ClipModel, ds: LabelledImages, layer: int, max_images: int | None,
                   dtype: str = "fp32") -> dict:
    return {"format": FORMAT, "model": model.name, "layer": model.resolve_layer(layer), "d_model": model.d_model,
            "dataset": ds.name, "split": ds.split, "max_images": max_images, "extract_dtype": check_dtype(dtype)}


def _check_identity(out_dir: Path, manifest: dict, ident: dict) -> dict:
    if {k: manifest.get(k, IDENTITY_DEFAULTS.get(k)) for k in ident} != ident:
        raise PatchSAEError(f"{out_dir} holds a cache of something else ({manifest['model']}, layer "
                            f"{manifest['layer']}, {manifest['dataset']}/{manifest['split']}, forward in "
                            f"{manifest.get('extract_dtype', 'fp32')}); use another run directory")
    return manifest


def build_cache(model: ClipModel, ds: LabelledImages, layer: int, out_dir: str | Path, batch_size: int = 256,
                shard_images: int = 4096, max_images: int | None = None, progress: bool = True,
                dist: Dist = Dist(), dtype: str = "fp32", workers: int = 0) -> dict:
    """Write the cache (or finish a killed extraction, or return an existing matching one); return manifest.
    Under torchrun every rank calls it with its `dist` and gets the manifest. `dtype`: the forward's precision
    (activations/precision.py); `workers`: image-decoding processes (data.base.iter_batches)."""
    out_dir = Path(out_dir)
    ident = cache_identity(model, ds, layer, max_images, dtype)
    manifest_file = out_dir / "manifest.json"
    if manifest_file.exists():
        return _check_identity(out_dir, read_json(manifest_file), ident)
    check_not_empty(ds)
    n_total = min(len(ds), max_images) if max_images else len(ds)
    plan = {**ident, "shard_images": shard_images, "n_total": n_total}
    progress_file = out_dir / "progress.json"
    if progress_file.exists() and read_json(progress_file) != plan:
        raise PatchSAEError(f"{progress_file} belongs to another extraction; delete {out_dir} to start again")
    dist.barrier()  # every rank has checked the plan before rank 0 may write it
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(progress_file, plan)

    resolved = model.resolve_layer(layer)
    n_shards = -(-n_total // shard_images)
    for k in range(dist.rank, n_shards, dist.world):
        if not (out_dir / f"shard_{k:05d}.done.json").exists():
            _extract_shard(model, ds, resolved, out_dir, k, range(k * shard_images, min((k + 1) * shard_images, n_total)),
                           batch_size, f"cache {ds.split} shard {k + 1}/{n_shards}" if progress and dist.is_main else None,
                           dtype, workers)
    dist.barrier()
    if dist.is_main:
        _write_manifest(model, ds, ident, out_dir, n_shards)
    dist.barrier()
    return read_json(manifest_file)


def _extract_shard(model: ClipModel, ds: LabelledImages, layer: int, out_dir: Path, k: int, order: range,
                   batch_size: int, desc: str | None, dtype: str = "fp32", workers: int = 0) -> None:
    """Shard k's arrays, then its done-record (the mark that the shard is complete). Activations go straight
    into a memory-mapped file, so memory holds one batch, not the shard (1.2 GB at ViT-B/16 x 4,096 images)."""
    name, skips, index, n = f"shard_{k:05d}", SkipLog(), [], 0
    final = out_dir / f"{name}.npy"
    with atomic_path(final) as tmp:
        acts = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                         shape=(len(order), model.layout().n_tokens, model.d_model))
        batches = iter_batches(ds, model.preprocess, batch_size, order, skips, desc, workers=workers,
                               pin_memory=model.device.type == "cuda")
        for pixels, labels, idx in batches:
            with torch.no_grad(), autocast(dtype, model.device):
                h_BTD = model.block_output(pixels, layer)
            if not torch.isfinite(h_BTD).all():
                raise PatchSAEError(f"non-finite activations for images {idx[:5].tolist()}... of {ds.name}")
            acts[n: n + len(h_BTD)] = h_BTD.to(torch.float16).cpu().numpy()
            index.append(np.stack([idx.numpy(), labels.numpy()], 1))
            n += len(h_BTD)
        acts.flush()
        del acts
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
        done = read_json(out_dir / f"shard_{k:05d}.done.json")
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


class ActivationCache:
    """Read side of the cache: memory-mapped shards, image rows addressed globally."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        mf = self.folder / "manifest.json"
        if not mf.exists():
            hint = " (extraction was interrupted; run the cache stage again to finish it)" \
                if (self.folder / "progress.json").exists() else ""
            raise PatchSAEError(f"no activation cache in {self.folder}{hint}")
        self.manifest = read_json(mf)
        if self.manifest.get("format") != FORMAT:
            raise PatchSAEError(f"{mf}: unknown cache format {self.manifest.get('format')!r}")
        self.shards = [np.load(self.folder / s["file"], mmap_mode="r") for s in self.manifest["shards"]]
        self.index = np.concatenate([np.load(self.folder / s["index_file"]) for s in self.manifest["shards"]])
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
