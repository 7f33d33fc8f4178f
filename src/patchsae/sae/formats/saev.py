"""saev checkpoints (github.com/samuelstevens/saev): one `.pt` file = one JSON header line, then a
`torch.save`d state dict with W_enc [d_model, d_sae], b_enc, W_dec [d_sae, d_model], b_dec (BatchTopK adds
`activation.threshold`, a scalar). saev is not on PyPI, so this follows its published `nn/modeling.py`:

- header without "schema" (the earliest files): the config itself, d_vit / d_sae, ReLU;
- schema 1: {"cls": "Relu"|"TopK"|"BatchTopK" or "SparseAutoencoderConfig", "cfg": {...}};
- schema 2-5: {"cfg": {..., "activation": {"cls": "TopK", "params": {"top_k": 32, ...}}}}.
Files whose config names the width `d_vit` subtract b_dec before encoding (the early encoder); files that name
it `d_model` encode x W_enc + b_enc (the current encoder), which we fold into b_enc.
TopK there keeps the k largest pre-activations even when negative; ours also applies ReLU, so the two differ
only on tokens with fewer than k positive pre-activations.
The state dict is read with `torch.load(weights_only=True)`: no code in the file runs.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.sae.formats.common import ForeignSAE, PlainSAE, finish, fold_b_dec_into_b_enc, need

MAX_HEADER = 1 << 20  # a header line longer than this is not a saev file


def looks_like_saev(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"{"
    except OSError:
        return False


def read_saev(path: Path, source: str | None = None) -> ForeignSAE:
    where = str(path)
    header, state = _read(path)
    cfg, act, top_k = _config(header, where)
    d_model = cfg.get("d_model", cfg.get("d_vit"))
    W_enc, b_enc, W_dec, b_dec = (t.float() for t in need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), where))
    if W_enc.dim() != 2 or W_enc.shape[0] != d_model:
        raise PatchSAEError(f"{where}: W_enc has shape {tuple(W_enc.shape)} but the header says d_model={d_model}")
    if "d_model" in cfg:
        b_enc = fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
    if act == "TopK":
        plain = PlainSAE("topk", W_enc, b_enc, W_dec, b_dec, k=min(int(top_k), W_enc.shape[1]))
    elif act == "BatchTopK":
        theta = float(state.get("activation.threshold", torch.zeros(())).reshape(-1)[0])
        plain = PlainSAE("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold_S=torch.full((W_enc.shape[1],), theta))
    elif act == "Relu":
        plain = PlainSAE("relu", W_enc, b_enc, W_dec, b_dec)
    else:
        raise PatchSAEError(f"{where}: saev activation {act!r} is not supported (Relu, TopK, BatchTopK)")
    return finish(plain, "saev", source or where, where,
                  info={"saev_schema": header.get("schema"), "saev_commit": header.get("commit"), "activation": act})


def _read(path: Path) -> tuple[dict, dict]:
    where = str(path)
    try:
        with open(path, "rb") as f:
            line = f.readline(MAX_HEADER)
            body = f.read()
    except OSError as exc:
        raise PatchSAEError(f"{where}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise PatchSAEError(f"{where}: not a saev checkpoint (the first line is not a JSON header)") from None
    if not isinstance(header, dict):
        raise PatchSAEError(f"{where}: not a saev checkpoint (the header is not a JSON object)")
    try:
        state = torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PatchSAEError(f"{where}: the state dict after the saev header is unreadable ({msg})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PatchSAEError(f"{where}: the saev body is not a state dict of tensors")
    return header, state


def _config(header: dict, where: str) -> tuple[dict, str, int | None]:
    """(cfg, activation class name, top_k) from any of the header schemas."""
    schema = header.get("schema")
    if schema is None:
        return header, "Relu", None
    cfg = header.get("cfg")
    if not isinstance(cfg, dict):
        raise PatchSAEError(f"{where}: saev header (schema {schema}) has no cfg object")
    if schema == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        return cfg, header["cls"], cfg.get("top_k", 32)
    if not isinstance(schema, int) or not 1 <= schema <= 5:
        raise PatchSAEError(f"{where}: unknown saev header schema {schema!r} (known: none, 1-5)")
    act = cfg.get("activation")
    if act is None:
        return cfg, "Relu", None
    if not isinstance(act, dict) or "cls" not in act:
        raise PatchSAEError(f"{where}: saev activation {act!r} is not in a known form")
    params = act.get("params") or {}
    return cfg, act["cls"], params.get("top_k", 32)


def write_saev(path: Path, plain: PlainSAE) -> None:
    """A schema-5 saev file of a ReLU or TopK SAE (the current encoder: no b_dec subtraction, so b_enc absorbs
    it). Used by the tests to build saev files; the CLI exports SAELens and sparsify."""
    if plain.arch not in ("relu", "topk"):
        raise PatchSAEError(f"saev export: {plain.arch} is not supported (relu, topk)")
    act = ({"cls": "TopK", "params": {"key": "top-k", "top_k": int(plain.k)}} if plain.arch == "topk"
           else {"cls": "Relu", "params": {"key": "relu"}})
    header = {"schema": 5, "cfg": {"d_model": plain.d_model, "d_sae": plain.d_sae, "activation": act},
              "commit": "unknown", "lib": "patchsae"}
    b_enc = (plain.b_enc_S.double() - plain.b_dec_D.double() @ plain.W_enc_DS.double()).float()
    state = {"W_enc": plain.W_enc_DS, "b_enc": b_enc, "W_dec": plain.W_dec_SD, "b_dec": plain.b_dec_D}
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save({k: v.detach().contiguous().cpu() for k, v in state.items()}, f)
