"""Extract once, train many times: a block's residual stream at every token, cached on disk.

On-disk format (version "patchsae-activations/1"), one folder per (model, layer, dataset, split):
  manifest.json            written last, atomically: model, layer, d_model, dataset, split, class_names,
                           token layout (kind of every token row), dtype, shards, image count, skipped images
  shard_NNNNN.npy          float16 array (images, tokens, d_model), NumPy .npy, memory-mappable
  shard_NNNNN.index.npy    int64 array (images, 2): dataset index and label of each row
  progress.json            while extraction runs: shards already complete, so a killed run continues
Shards are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages, SkipLog, check_not_empty, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.utils import atomic_path, read_json, write_json

FORMAT = "patchsae-activations/1"


def cache_identity(model: ClipModel, ds: LabelledImages, layer: int, max_images: int | None) -> dict:
    return {"format": FORMAT, "model": model.name, "layer": model.resolve_layer(layer), "d_model": model.d_model,
            "dataset": ds.name, "split": ds.split, "max_images": max_images}


def build_cache(model: ClipModel, ds: LabelledImages, layer: int, out_dir: str | Path, batch_size: int = 256,
                shard_images: int = 4096, max_images: int | None = None, progress: bool = True) -> dict:
    """Write the cache (or finish a killed extraction, or return an existing matching one); return manifest."""
    out_dir = Path(out_dir)
    ident = cache_identity(model, ds, layer, max_images)
    manifest_file = out_dir / "manifest.json"
    if manifest_file.exists():
        manifest = read_json(manifest_file)
        if {k: manifest.get(k) for k in ident} != ident:
            raise PatchSAEError(f"{out_dir} holds a cache of something else ({manifest['model']}, layer "
                                f"{manifest['layer']}, {manifest['dataset']}/{manifest['split']}); use another run directory")
        return manifest
    check_not_empty(ds)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_file = out_dir / "progress.json"
    state = read_json(progress_file) if progress_file.exists() else {**ident, "shards": [], "position": 0, "skipped": []}
    if {k: state.get(k) for k in ident} != ident:
        raise PatchSAEError(f"{progress_file} belongs to another extraction; delete {out_dir} to start again")

    n_total = min(len(ds), max_images) if max_images else len(ds)
    layout = model.layout()
    skips = SkipLog()
    resolved = model.resolve_layer(layer)
    pos = state["position"]
    while pos < n_total:
        order = range(pos, min(pos + shard_images, n_total))
        k = len(state["shards"])
        name = f"shard_{k:05d}"
        acts, index = [], []
        desc = f"cache {ds.split} shard {k + 1}/{-(-n_total // shard_images)}" if progress else None
        for pixels, labels, idx in iter_batches(ds, model.preprocess, batch_size, order, skips, desc):
            h_BTD = model.block_output(pixels, resolved)
            if not torch.isfinite(h_BTD).all():
                raise PatchSAEError(f"non-finite activations for images {idx[:5].tolist()}... of {ds.name}")
            acts.append(h_BTD.to(torch.float16).cpu().numpy())
            index.append(np.stack([idx.numpy(), labels.numpy()], 1))
        if acts:
            _save_npy(out_dir / f"{name}.npy", np.concatenate(acts))
            _save_npy(out_dir / f"{name}.index.npy", np.concatenate(index).astype(np.int64))
            state["shards"].append({"file": f"{name}.npy", "index_file": f"{name}.index.npy",
                                    "n_images": int(sum(len(a) for a in acts))})
        state["skipped"] += [[i, r] for i, r in skips.skipped]
        skips.skipped.clear()
        pos = order.stop
        state["position"] = pos
        write_json(progress_file, state)
    n_images = sum(s["n_images"] for s in state["shards"])
    if n_images == 0:
        raise PatchSAEError(f"no readable images in {ds.name} split {ds.split} ({len(state['skipped'])} skipped)")
    if state["skipped"]:
        print(f"warning: {len(state['skipped'])} unreadable image(s) skipped while caching", file=sys.stderr)
    manifest = {**ident, "class_names": list(ds.class_names), "layout": layout.to_json(),
                "n_tokens_per_image": layout.n_tokens, "dtype": "float16", "n_images": n_images,
                "shards": state["shards"], "skipped": state["skipped"]}
    write_json(manifest_file, manifest)
    progress_file.unlink()
    return manifest


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
