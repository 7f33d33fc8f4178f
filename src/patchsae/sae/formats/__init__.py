"""SAEs in and out of other libraries' formats.

`read_sae(src, fmt=None)` reads a SAELens folder, a sparsify folder, a saev `.pt`, the reference PatchSAE
checkpoint, this project's own SAE folder (or a run directory), or `hf:OWNER/REPO[/SUBFOLDER]` from the Hugging
Face hub, detecting the format from the files unless `fmt` names it. `write_sae(sae, out, fmt, ...)` writes a
SAELens or sparsify folder (input scale folded into the weights, so codes are unchanged) with our provenance in
a `patchsae.json` sidecar. Every failure is one PatchSAEError line.
"""

from __future__ import annotations

import json
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.sae.formats.common import SIDECAR, ForeignSAE, PlainSAE, plain_from_sae, sae_from_plain, sidecar_for
from patchsae.sae.formats.hub import resolve_hub
from patchsae.sae.formats.reference import read_reference
from patchsae.sae.formats.saelens import is_saelens, read_saelens, write_saelens
from patchsae.sae.formats.saev import looks_like_saev, read_saev
from patchsae.sae.formats.sparsify import is_sparsify, read_sparsify, write_sparsify
from patchsae.sae.model import SAE

FORMATS = ("saelens", "sparsify", "saev", "reference", "patchsae")
EXPORT_FORMATS = ("saelens", "sparsify")
_ZIP_MAGIC = b"PK\x03\x04"


def detect_format(path: Path, spec: str | None = None) -> tuple[str, Path]:
    """(format, the file or folder holding it). A folder with exactly one SAE sub-folder (a sparsify repo
    with one hookpoint, a run directory's sae/) resolves to it. `spec` (an hf: source) names the folder in
    errors instead of its cache path."""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        if head == _ZIP_MAGIC:
            return "reference", path
        if head[:1] == b"{":
            return "saev", path
        raise PatchSAEError(f"{path}: not a recognised SAE file (a saev .pt starts with a JSON line, a torch "
                            "checkpoint is a zip archive)")
    if not path.is_dir():
        raise PatchSAEError(f"{path}: no such file or folder")
    found = _folder_format(path)
    if found:
        return found, path
    subs = [(f, p) for p in sorted(path.iterdir()) if p.is_dir() and (f := _folder_format(p))]
    if len(subs) == 1:
        return subs[0][0], subs[0][1]
    if subs:
        names = ", ".join(p.name for _, p in subs)
        raise PatchSAEError(f"{spec or path} holds {len(subs)} SAEs ({names}); pass "
                            + (f"{spec.rstrip('/')}/NAME with one of them" if spec else "one of them"))
    raise PatchSAEError(f"{spec or path}: no SAE found (expected SAELens cfg.json + sae_weights.safetensors, sparsify "
                        "cfg.json + sae.safetensors, or patchsae config.json + model.safetensors)")


def _folder_format(folder: Path) -> str | None:
    if is_saelens(folder):
        return "saelens"
    if is_sparsify(folder):
        return "sparsify"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return "patchsae"
    return None


def read_sae(src: str | Path, fmt: str | None = None) -> ForeignSAE:
    """Read an SAE from any supported source; see the module docstring."""
    spec = str(src)
    path = resolve_hub(spec) if spec.startswith("hf:") else Path(spec).expanduser()
    if fmt is not None and fmt not in FORMATS:
        raise PatchSAEError(f"unknown SAE format {fmt!r} (choose {', '.join(FORMATS)})")
    found, where = detect_format(path, spec if spec.startswith("hf:") else None) if fmt is None else (fmt, path)
    if fmt is not None and path.is_dir() and fmt in ("saelens", "sparsify", "patchsae"):
        found, where = _sub_of_format(path, fmt)
    readers = {"saelens": read_saelens, "sparsify": read_sparsify, "saev": read_saev,
               "reference": read_reference, "patchsae": _read_ours}
    if found in ("saev", "reference") and not where.is_file():
        raise PatchSAEError(f"{where}: a {found} SAE is a single file, not a folder")
    return readers[found](where, spec)


def _sub_of_format(path: Path, fmt: str) -> tuple[str, Path]:
    if _folder_format(path) == fmt:
        return fmt, path
    subs = [p for p in sorted(path.iterdir()) if p.is_dir() and _folder_format(p) == fmt]
    if len(subs) != 1:
        raise PatchSAEError(f"{path}: no single {fmt} SAE here ({len(subs)} found)")
    return fmt, subs[0]


def _read_ours(folder: Path, source: str) -> ForeignSAE:
    from patchsae.sae.checkpoint import load_sae

    sae, meta = load_sae(folder)
    return ForeignSAE(sae.eval(), "patchsae", source, model=meta.get("model"), layer=meta.get("layer"),
                      tokens=meta.get("tokens"), dataset=meta.get("dataset"), info={}, ours=True)


def check_fits(foreign: ForeignSAE, d_model: int, n_layers: int, layer: int | None) -> int:
    """The block index (0..n_layers-1) the SAE hooks in a model of width d_model with n_layers blocks; one line
    if its width differs, its recorded block does not exist there, or `layer` (asked for) names another block."""
    name = foreign.source
    if foreign.sae.cfg.d_model != d_model:
        raise PatchSAEError(f"{name} reads activations of width {foreign.sae.cfg.d_model}, but the model's blocks "
                            f"have width {d_model}" + (f" (it was trained on {foreign.model})" if foreign.model else ""))
    resolved = {}
    for what, value in (("its file", foreign.layer), ("--layer", layer)):
        if value is None:
            continue
        if not -n_layers <= value < n_layers:
            raise PatchSAEError(f"{name}: block {value} (from {what}) does not exist in a model with {n_layers} blocks")
        resolved[what] = value % n_layers
    if len(set(resolved.values())) > 1:
        raise PatchSAEError(f"{name} hooks block {foreign.layer} but --layer {layer} asks for block "
                            f"{resolved['--layer']}; drop --layer or pass the block the SAE was trained on")
    if not resolved:
        raise PatchSAEError(f"{name} does not say which block it hooks; pass --layer")
    return next(iter(resolved.values()))


def write_sae(sae: SAE, folder: Path, fmt: str, model: str | None = None, layer: int | None = None,
              tokens: str | None = None, dataset: str | None = None, info: dict | None = None) -> None:
    """Write `sae` in `fmt` into an existing (temporary) folder, with our sidecar; see utils.atomic_dir."""
    if fmt not in EXPORT_FORMATS:
        raise PatchSAEError(f"unknown export format {fmt!r} (choose {', '.join(EXPORT_FORMATS)})")
    plain = plain_from_sae(sae)
    if fmt == "saelens":
        write_saelens(folder, plain, model=model, layer=layer,
                      extra_metadata={"patchsae_tokens": tokens, "dataset_path": dataset})
    else:
        write_sparsify(folder, plain)
    side = sidecar_for(sae, model, layer, tokens, dataset, info)
    (folder / SIDECAR).write_text(json.dumps(side, indent=2) + "\n")


__all__ = ["FORMATS", "EXPORT_FORMATS", "ForeignSAE", "PlainSAE", "check_fits", "detect_format", "read_sae", "write_sae",
           "plain_from_sae", "sae_from_plain"]
