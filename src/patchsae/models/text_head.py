"""The zero-shot text head with a disk cache, so reruns skip the text tower."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from patchsae.models.backbone import Backbone
from patchsae.utils import write_safetensors


def cached_text_head(model: Backbone, class_names: Sequence[str], path: str | Path, write: bool = True,
                     renormalise: bool = True) -> torch.Tensor:
    """The zero-shot head (classes, E), stored at `path` keyed by model + class names + templates, so a rerun
    (or a rerun with another split) skips the text tower; any change of those three recomputes it. A reader that
    must not write (the explorer) passes write=False and only uses a matching cache. renormalise=False (the
    reference masking protocol) is part of the key."""
    from safetensors import safe_open

    path = Path(path)
    key = hashlib.sha256(json.dumps([model.name, list(class_names), list(model.templates)]
                                    + ([] if renormalise else ["not renormalised"])).encode()).hexdigest()
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("head_CE").to(model.device)
        except Exception:  # noqa: BLE001 - an unreadable cache is recomputed, never trusted
            pass
    head_CE = model.text_head(class_names, renormalise=renormalise)
    if not write:
        return head_CE
    write_safetensors(path, {"head_CE": head_CE.contiguous().cpu()}, {"key": key, "model": model.name})
    return head_CE
