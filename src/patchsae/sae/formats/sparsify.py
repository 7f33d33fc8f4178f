"""EleutherAI sparsify folders (one per hookpoint): `cfg.json` (SparseCoderConfig fields + d_in) and
`sae.safetensors` with encoder.weight [num_latents, d_in], encoder.bias [num_latents], W_dec [num_latents, d_in],
b_dec [d_in]. Codes: TopK of ReLU((x - b_dec) encoder.weight^T + encoder.bias), which is our TopK; decode
f W_dec + b_dec. `SparseCoder.load_from_disk(folder)` reads what `write_sparsify` writes.

Transcoders, skip connections and the groupmax activation have no equivalent here and are refused. sparsify
records no model or hookpoint in cfg.json: the layer comes from the folder name (e.g. `layers.10`) and,
for our own exports, from the sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.sae.formats.common import (ForeignSAE, PlainSAE, finish, need, read_json_file, read_safetensors,
                                         read_sidecar)
from patchsae.sae.formats.saelens import layer_of

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def is_sparsify(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def write_sparsify(folder: Path, plain: PlainSAE) -> None:
    """Write the sparsify files into an existing (temporary) folder. Only TopK SAEs have a sparsify form."""
    from safetensors.torch import save_file

    if plain.arch != "topk":
        raise PatchSAEError(f"sparsify has only TopK SAEs; this one is {plain.arch} (export it as saelens instead)")
    cfg = {"activation": "topk", "expansion_factor": max(1, plain.d_sae // plain.d_model),
           "normalize_decoder": True, "num_latents": plain.d_sae, "k": int(plain.k), "multi_topk": False,
           "skip_connection": False, "transcode": False, "d_in": plain.d_model}
    tensors = {"encoder.weight": plain.W_enc_DS.t(), "encoder.bias": plain.b_enc_S, "W_dec": plain.W_dec_SD,
               "b_dec": plain.b_dec_D}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def read_sparsify(folder: Path, source: str | None = None) -> ForeignSAE:
    where = str(folder)
    cfg = read_json_file(folder / CFG, "sparsify config")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise PatchSAEError(f"{where}: a sparsify {flag.replace('_', ' ')} SAE is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise PatchSAEError(f"{where}: sparsify activation {cfg.get('activation')!r} is not supported (topk)")
    state = read_safetensors(folder / WEIGHTS)
    W_SD, b_S, W_dec, b_dec = need(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    d_in = cfg.get("d_in")
    if W_SD.dim() != 2 or W_SD.shape[1] != d_in:
        raise PatchSAEError(f"{where}: encoder.weight has shape {tuple(W_SD.shape)} but cfg.json says d_in={d_in}")
    num = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    if W_SD.shape[0] != num:
        raise PatchSAEError(f"{where}: encoder.weight has {W_SD.shape[0]} latents but cfg.json says {num}")
    k = cfg.get("k", 32)
    if not isinstance(k, int):
        raise PatchSAEError(f"{where}: k={k!r} is not an integer")
    plain = PlainSAE("topk", W_SD.t().contiguous(), b_S, W_dec, b_dec, k=k)
    return finish(plain, "sparsify", source or where, where, read_sidecar(folder), layer=layer_of(folder.name),
                  info={"hookpoint": folder.name})
