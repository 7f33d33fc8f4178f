"""Load a backbone from any supported source.

Sources: `embedded` (the Fashion-MNIST CLIP shipped in this package), a local Hugging Face folder of a CLIP,
SigLIP or DINOv2 (with or without registers; its config.json's model_type decides), a hub id such as
`openai/clip-vit-base-patch16` (needs the hub or a filled HF cache), or a checkpoint file in OpenAI's original
layout (.pt/.pth/.bin/.safetensors; see `openai_format`, also open_clip's OpenAI-style ViTs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.models.backbone import Backbone
from patchsae.models.clip import ClipModel
from patchsae.models.dinov2 import DEFAULT_PREPROCESS as DINOV2_PREPROCESS, Dinov2Backbone
from patchsae.models.openai_format import CHECKPOINT_SUFFIXES, MissingTokenizer, load_openai_checkpoint
from patchsae.models.preprocess import Preprocess, preprocess_from_folder
from patchsae.models.siglip import SiglipBackbone
from patchsae.models.templates import EMBEDDED_TEMPLATES, IMAGENET_TEMPLATES

EMBEDDED_DIR = Path(__file__).parent / "embedded"
REAL_DEFAULT = "openai/clip-vit-base-patch16"


@dataclass(frozen=True)
class Family:
    """One kind of backbone `load_model` recognises by the model_type in its config.json."""

    name: str  # what `patchsae models` calls it
    model_types: tuple[str, ...]  # config.json model_type values of this family
    hf_class: str  # the transformers model class it is loaded with
    tokens: str  # the token kinds of its layout, in order
    head: str  # how it classifies


FAMILIES = (
    Family("clip", ("clip",), "CLIPModel", "cls, patch (+ prompt with MaPLe)", "text tower: softmax zero-shot head"),
    Family("siglip", ("siglip",), "SiglipModel", "patch (no class token)",
           "text tower: sigmoid zero-shot head with its learnt bias"),
    Family("dinov2", ("dinov2",), "Dinov2Model", "cls, patch", "no text tower: the run's linear probe "
           "(patchsae probe)"),
    Family("dinov2-registers", ("dinov2_with_registers",), "Dinov2WithRegistersModel", "cls, register, patch",
           "no text tower: the run's linear probe (patchsae probe)"),
)


def _hf_file(source: str, name: str, local: bool) -> Path | None:
    """`name` in a local folder, or from the hub (cache) for a hub id; None if it has none."""
    if local:
        path = Path(source) / name
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def _family(source: str, local: bool) -> Family:
    """The family named by config.json's model_type (CLIP when there is none to read, so that loading it gives
    CLIP's own error)."""
    cfg_file = _hf_file(source, "config.json", local)
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file else None
    except (OSError, ValueError, AttributeError):
        model_type = None
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    if model_type is None:
        return FAMILIES[0]
    known = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise PatchSAEError(f"{source}: model_type {model_type!r} is not a supported backbone (supported: {known})")


# PyTorch's fused scaled-dot-product attention (flash / memory-efficient kernels on a GPU), asked for by name so
# that a transformers default changing does not silently bring back the eager softmax(QK^T)V
ATTENTION = "sdpa"


def _load_hf(source: str, local: bool, device: str, hf_class: str = "CLIPModel", tokenizer: bool = True):
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    what = hf_class.removesuffix("Model")
    try:
        model = getattr(transformers, hf_class).from_pretrained(source, local_files_only=local,
                                                               attn_implementation=ATTENTION)
        tok = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local) if tokenizer else None
    except OSError as exc:
        if local:
            raise PatchSAEError(f"{source}: not a loadable Hugging Face {what} folder ({exc})") from None
        raise PatchSAEError(
            f"cannot load {source!r}: the Hugging Face hub is unreachable and it is not in the local cache; "
            "download it on a connected machine (huggingface-cli download) and pass the local folder"
        ) from None
    return model.to(device), tok


def _preprocess(source: str, local: bool, image_size: int, default: Preprocess | None = None) -> Preprocess:
    found = _hf_file(source, "preprocessor_config.json", local)
    return preprocess_from_folder(found.parent, image_size) if found else default or Preprocess(image_size)


def _fixed_size(pre: Preprocess, source: str, image_size: int) -> Preprocess:
    """CLIP and SigLIP do not interpolate their position embeddings: the preprocessing must make their size."""
    if pre.size != image_size:
        raise PatchSAEError(f"{source}: preprocessor_config.json makes {pre.size}x{pre.size} images but the model "
                            f"takes {image_size}x{image_size}")
    return pre


def _load_folder(source: str, local: bool, device: str, name: str, templates) -> Backbone:
    fam = _family(source, local)
    model, tok = _load_hf(source, local, device, fam.hf_class, tokenizer=fam.name in ("clip", "siglip"))
    if fam.name.startswith("dinov2"):
        return Dinov2Backbone(model, _preprocess(source, local, 224, DINOV2_PREPROCESS), name)
    size = model.config.vision_config.image_size
    pre = _fixed_size(_preprocess(source, local, size), source, size)
    return (SiglipBackbone if fam.name == "siglip" else ClipModel)(model, tok, pre, name, templates)


def _load_openai(path: Path, device: str, tokenizer: str | None, act: str | None) -> ClipModel:
    model, tok = load_openai_checkpoint(path, device, tokenizer, act)
    pre = Preprocess(model.config.vision_config.image_size)
    # the activation is part of the model's identity (caches, SAEs and text heads record the name)
    name = str(path) if model.config.vision_config.hidden_act == "quick_gelu" else f"{path} [gelu]"
    return ClipModel(model, MissingTokenizer(path) if tok is None else tok, pre, name, IMAGENET_TEMPLATES)


def load_model(source: str = "embedded", device: str = "cpu", tokenizer: str | None = None,
               act: str | None = None) -> Backbone:
    """`tokenizer`: a tokenizer folder for checkpoint files that have no vocab.json/merges.txt beside them;
    `act`: "quick_gelu" or "gelu" for OpenAI-layout checkpoint files (None: decided as `resolve_act` says)."""
    if source == "embedded":
        if not (EMBEDDED_DIR / "model.safetensors").exists():
            raise PatchSAEError(f"embedded model missing at {EMBEDDED_DIR}; run scripts/train_embedded.py")
        return _load_folder(str(EMBEDDED_DIR), True, device, "embedded", EMBEDDED_TEMPLATES)
    path = Path(source)
    if path.is_dir():
        return _load_folder(str(path), True, device, str(path), IMAGENET_TEMPLATES)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return _load_openai(path, device, tokenizer, act)
    if path.suffix or source.startswith((".", "/")):
        raise PatchSAEError(f"model {source!r}: no such folder or checkpoint file")
    return _load_folder(source, False, device, source, IMAGENET_TEMPLATES)
