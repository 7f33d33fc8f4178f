"""Precision of the backbone's forward during activation extraction (`--dtype fp32|bf16|fp16`).

bf16 and fp16 run the forward under torch.autocast: matmuls and attention in the low precision (tensor cores on
a GPU, AMX on recent Xeons), norms and softmax kept in fp32 by autocast's own rules. The cache is written in fp16
whatever the forward's precision, so a bf16 extraction costs no extra disk, only bf16's ~3 significant digits
in the activations (tests/test_cache.py bounds the difference to an fp32 extraction).
"""

from __future__ import annotations

import contextlib

import torch

from patchsae import PatchSAEError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(name: str) -> str:
    if name not in DTYPES:
        raise PatchSAEError(f"unknown extraction dtype {name!r} (choose {', '.join(DTYPES)})")
    return name


def autocast(name: str, device: torch.device | str):
    """The context a forward at precision `name` runs in on `device` (fp32: none)."""
    low = DTYPES[check_dtype(name)]
    if low is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=low)
