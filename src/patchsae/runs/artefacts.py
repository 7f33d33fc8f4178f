"""One reader per artefact of a run, and one staleness rule for everything derived from the SAE.

The rule: an artefact is current when the identity recorded in its manifest equals the identity asked for —
the SAE that produced it (sha256 of its weights), and whichever of model, layer, dataset, split and parameters
the reader needs to match. Manifests written before the SAE's hash was recorded fall back to file times (the
artefact must be newer than the SAE's weights).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from patchsae import PatchSAEError
from patchsae.runs.run import Run
from patchsae.utils import read_json, read_json_file


def open_run(run: Run):
    """(cfg, model, sae, layer): the run's config, model, SAE and resolved hooked block, refusing an SAE that was
    not trained on this model's hooked block."""
    from patchsae.models.load import load_model
    from patchsae.sae.checkpoint import load_sae

    if run.layer is None and run.hooked_layers() is not None:
        raise PatchSAEError(f"{run.path} hooks several blocks {run.hooked_layers()}: open it at one (Run.at, --layer)")
    cfg = run.load_config()
    model = load_model(cfg.model, cfg.device, act=cfg.act)
    layer = model.resolve_layer(cfg.layer)
    sae, meta = load_sae(run.sae_dir, d_model=model.d_model)
    recorded = [("the SAE's config", meta)]
    cache_manifest = run.cache_dir(cfg.train_split) / "manifest.json"
    if cache_manifest.exists():
        info = read_json_file(cache_manifest, "cache manifest")
        if not isinstance(info, dict):
            raise PatchSAEError(f"{cache_manifest}: damaged cache manifest (not a JSON object)")
        recorded.append((f"its training cache {cache_manifest}", info))
    for where, info in recorded:
        if "layer" in info and info["layer"] != layer:
            raise PatchSAEError(f"the SAE in {run.sae_dir} was trained on block {info['layer']} ({where}), "
                                f"but the run's config hooks block {layer} of {model.name}")
        if "model" in info and info["model"] != model.name:
            raise PatchSAEError(f"the SAE in {run.sae_dir} was trained on {info['model']} ({where}), "
                                f"but the run's config names {model.name}")
    return cfg, model, sae, layer


def open_run_dataset(cfg, dataset: str | None, split: str):
    """`dataset` (a --dataset spec), or the run's own dataset read from its local copy if it has one."""
    from patchsae.data import open_dataset

    return open_dataset(dataset or cfg.dataset, split, path=None if dataset else cfg.dataset_path)


def sae_origin(run: Run) -> dict | None:
    """{format, source} of an SAE that `patchsae import` brought into the run; None for one trained here."""
    cfg_file = run.sae_dir / "config.json"
    imported = read_json(cfg_file).get("imported") if cfg_file.exists() else None
    return {"format": imported.get("format"), "source": imported.get("source")} if imported else None


def sae_identity(run: Run) -> str | None:
    """sha256 of the SAE's weights file (None while there is none): what every derived artefact records."""
    if not run.sae_weights.exists():
        return None
    h = hashlib.sha256()
    with run.sae_weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_current(run: Run, manifest: dict, artefact: Path, want: dict | None = None) -> bool:
    """The staleness rule (module docstring): same SAE, and every key of `want` equal in the manifest."""
    recorded = manifest.get("sae_sha256")
    if recorded is not None:
        same_sae = recorded == sae_identity(run)
    else:  # written before hashes were recorded: it must be newer than the SAE's weights
        same_sae = not run.sae_weights.exists() or artefact.stat().st_mtime >= run.sae_weights.stat().st_mtime
    return same_sae and all(manifest.get(k) == v for k, v in (want or {}).items())


@dataclass(frozen=True)
class Analysis:
    """What `analyze` wrote: its manifest and every per-latent tensor (see stages/analyze.py)."""

    manifest: dict
    tensors: dict[str, torch.Tensor]

    def names(self) -> list[str]:
        """Each latent's top concept name ('' if none)."""
        vocab = self.manifest["naming"]["vocabulary"]
        return [vocab[int(i)] if i >= 0 else "" for i in self.tensors["name_index_SN"][:, 0]]


def read_analysis(run: Run, d_sae: int, want: dict | None = None) -> Analysis | None:
    """The run's `analyze` output if it exists, describes an SAE of d_sae latents and is current (see
    `is_current`); else None."""
    from safetensors.torch import load_file

    mf, stats = run.analysis_dir / "manifest.json", run.analysis_dir / "stats.safetensors"
    try:
        manifest = read_json_file(mf, "analysis manifest")
        if not isinstance(manifest, dict) or manifest.get("d_sae") != d_sae or \
                not is_current(run, manifest, stats, want):
            return None
        tensors = load_file(str(stats))
    except (PatchSAEError, OSError, ValueError, KeyError, SafetensorError):
        return None  # missing or damaged: the analysis is simply not there, and `analyze` writes it again
    names = manifest.get("naming", {}).get("vocabulary") if isinstance(manifest.get("naming"), dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    ok = all(k in tensors and len(tensors[k]) == d_sae for k in ("frequency_S", "name_index_SN")) and \
        tensors["name_index_SN"].dim() == 2 and tensors["name_index_SN"].dtype in (torch.int64, torch.int32) and \
        tensors["name_index_SN"].lt(len(names)).all()
    return Analysis(manifest, tensors) if ok else None


def require_analysis(run: Run, d_sae: int) -> Analysis:
    """`read_analysis`, or one line saying how to make it."""
    found = read_analysis(run, d_sae)
    if found is None:
        raise PatchSAEError(f"{run.path} has no current concept statistics for its SAE ({run.analysis_dir}); run "
                            f"`patchsae analyze --run {run.path}` first")
    if "kind_S" not in found.tensors:
        raise PatchSAEError(f"{run.analysis_dir} was written before latent kinds existed; rerun `patchsae analyze "
                            f"--run {run.path}`")
    return found


def cache_covering(run: Run, split: str, want: dict, max_images: int | None, n_classes: int):
    """The run's activation cache of `split` if it was made with `want` (dataset, split, model, layer), holds
    the first `max_images` images (all if None) and has n_classes classes; else None."""
    from patchsae.activations.cache import ActivationCache

    folder = run.cache_dir(split)
    try:
        m = read_json_file(folder / "manifest.json", "cache manifest")
    except PatchSAEError:
        return None
    if not isinstance(m, dict) or not isinstance(m.get("max_images"), (int, type(None))):
        return None
    covers = m.get("max_images") is None or (max_images is not None and m["max_images"] >= max_images)
    if {k: m.get(k) for k in want} == want and covers and len(m.get("class_names", [])) == n_classes:
        return ActivationCache(folder)
    return None
