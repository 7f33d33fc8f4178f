"""Load a CLIP from any supported source into a `ClipModel`.

Sources: `embedded` (the Fashion-MNIST CLIP shipped in this package), a local Hugging Face CLIP folder, a
hub id such as `openai/clip-vit-base-patch16` (needs the hub or a filled HF cache), or a checkpoint file in
OpenAI's original layout (.pt/.pth/.bin/.safetensors; see `openai_format`).
"""

from __future__ import annotations

from pathlib import Path

from patchsae import PatchSAEError
from patchsae.models.clip import ClipModel
from patchsae.models.openai_format import CHECKPOINT_SUFFIXES, MissingTokenizer, load_openai_checkpoint
from patchsae.models.preprocess import Preprocess, preprocess_for_size
from patchsae.models.templates import EMBEDDED_TEMPLATES, IMAGENET_TEMPLATES

EMBEDDED_DIR = Path(__file__).parent / "embedded"
REAL_DEFAULT = "openai/clip-vit-base-patch16"


def _load_hf(source: str, local: bool, device: str):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    try:
        model = CLIPModel.from_pretrained(source, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except OSError as exc:
        if local:
            raise PatchSAEError(f"{source}: not a loadable Hugging Face CLIP folder ({exc})") from None
        raise PatchSAEError(
            f"cannot load {source!r}: the Hugging Face hub is unreachable and it is not in the local cache; "
            "download it on a connected machine (huggingface-cli download) and pass the local folder"
        ) from None
    return model.to(device), tokenizer


def _load_openai(path: Path, device: str, tokenizer: str | None, act: str | None) -> ClipModel:
    model, tok = load_openai_checkpoint(path, device, tokenizer, act)
    pre = Preprocess(model.config.vision_config.image_size)
    return ClipModel(model, MissingTokenizer(path) if tok is None else tok, pre, str(path), IMAGENET_TEMPLATES)


def load_model(source: str = "embedded", device: str = "cpu", tokenizer: str | None = None,
               act: str | None = None) -> ClipModel:
    """`tokenizer`: a tokenizer folder for checkpoint files that have no vocab.json/merges.txt beside them;
    `act`: "quick_gelu" or "gelu" for OpenAI-layout checkpoint files (None: decided as `resolve_act` says)."""
    if source == "embedded":
        if not (EMBEDDED_DIR / "model.safetensors").exists():
            raise PatchSAEError(f"embedded model missing at {EMBEDDED_DIR}; run scripts/train_embedded.py")
        model, tok = _load_hf(str(EMBEDDED_DIR), True, device)
        pre = preprocess_for_size(EMBEDDED_DIR, model.config.vision_config.image_size)
        return ClipModel(model, tok, pre, "embedded", EMBEDDED_TEMPLATES)
    path = Path(source)
    if path.is_dir():
        model, tok = _load_hf(str(path), True, device)
        pre = preprocess_for_size(path, model.config.vision_config.image_size)
        return ClipModel(model, tok, pre, str(path), IMAGENET_TEMPLATES)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return _load_openai(path, device, tokenizer, act)
    if path.suffix or source.startswith((".", "/")):
        raise PatchSAEError(f"model {source!r}: no such folder or checkpoint file")
    model, tok = _load_hf(source, False, device)
    pre = preprocess_for_size(Path(model.name_or_path), model.config.vision_config.image_size)
    return ClipModel(model, tok, pre, source, IMAGENET_TEMPLATES)
