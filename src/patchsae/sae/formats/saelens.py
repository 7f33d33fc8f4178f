"""SAELens 6.x folders: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in],
b_dec; JumpReLU adds `threshold` [d_sae]). `SAE.load_from_disk(folder)` reads what `write_saelens` writes.

Read: architectures standard (ReLU), topk (optionally with rescale_acts_by_decoder_norm, folded into the
weights) and jumprelu; apply_b_dec_to_input=False is folded into b_enc; pre-6.0 configs (hook_point,
activation_fn) are read the way SAELens's own loader reads them. Per-token input normalisations (layer_norm,
constant_norm_rescale, covariance_whitening) have no equivalent here and are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.sae.formats.common import (SIDECAR, ForeignSAE, PlainSAE, finish, fold_b_dec_into_b_enc, need,
                                         read_json_file, read_safetensors, read_sidecar)

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.54.12"  # the SAELens release whose loader the tests run against our files
_ARCH_OUT = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_BLOCK = re.compile(r"(?:blocks|layers|resblocks|layer)[._\[](-?\d+)")


def is_saelens(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def hook_name(layer: int | None) -> str | None:
    """The hook name ViT-Prisma / TransformerLens give the residual stream after block `layer`."""
    return None if layer is None else f"blocks.{layer}.hook_resid_post"


def layer_of(hook: str | None) -> int | None:
    """Block index in a hook or module name ("blocks.10.hook_resid_post", "vision_model.encoder.layers.10")."""
    m = _BLOCK.search(hook or "")
    return int(m.group(1)) if m else None


def write_saelens(folder: Path, plain: PlainSAE, model: str | None = None, layer: int | None = None,
                  extra_metadata: dict | None = None) -> None:
    """Write the SAELens files into an existing (temporary) folder; the caller makes the folder atomic."""
    from safetensors.torch import save_file

    if plain.arch not in _ARCH_OUT:
        raise PatchSAEError(f"SAELens export: no SAELens architecture for {plain.arch!r}")
    tensors = {"W_enc": plain.W_enc_DS, "b_enc": plain.b_enc_S, "W_dec": plain.W_dec_SD, "b_dec": plain.b_dec_D}
    cfg = {"architecture": _ARCH_OUT[plain.arch], "d_in": plain.d_model, "d_sae": plain.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none"}
    if plain.arch == "topk":
        cfg.update(k=int(plain.k), rescale_acts_by_decoder_norm=False)
    if plain.arch == "jumprelu":
        tensors["threshold"] = plain.threshold_S
    cfg["metadata"] = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": None,
                       "model_name": model, "hook_name": hook_name(layer), "hook_head_index": None,
                       "model_class_name": "HookedViT", **(extra_metadata or {})}
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CFG).write_text(json.dumps(cfg, indent=2) + "\n")


def read_saelens(folder: Path, source: str | None = None) -> ForeignSAE:
    where = str(folder)
    cfg = _modern_cfg(read_json_file(folder / CFG, "SAELens config"))
    _refuse_unsupported(cfg, where)
    state = read_safetensors(folder / WEIGHTS)
    if "scaling_factor" in state and not torch.allclose(state["scaling_factor"], torch.ones(())):
        raise PatchSAEError(f"{where}: a fine-tuning scaling factor is not supported; fold it into W_dec first")
    W_enc, b_enc, W_dec, b_dec = need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    if W_enc.dim() != 2 or (cfg.get("d_in"), cfg.get("d_sae")) != tuple(W_enc.shape):
        raise PatchSAEError(f"{where}: W_enc has shape {tuple(W_enc.shape)} but cfg.json says d_in="
                            f"{cfg.get('d_in')}, d_sae={cfg.get('d_sae')}")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = fold_b_dec_into_b_enc(W_enc, b_enc, b_dec)
    arch = cfg.get("architecture", "standard")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # pre * ||W_dec row|| selects and scales; so does pre of (W_enc, b_enc) * norm with rows / norm
        norm_S = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norm_S, b_enc * norm_S, W_dec / norm_S[:, None]
    plain = PlainSAE({"standard": "relu"}.get(arch, arch), W_enc, b_enc, W_dec, b_dec,
                     k=int(cfg["k"]) if arch == "topk" and "k" in cfg else None,
                     threshold_S=state.get("threshold") if arch == "jumprelu" else None)
    if arch == "jumprelu" and plain.threshold_S is None:
        raise PatchSAEError(f"{where}: a jumprelu SAE without a threshold tensor")
    meta = cfg.get("metadata") or {}
    return finish(plain, "saelens", source or where, where, read_sidecar(folder), model=meta.get("model_name"),
                  layer=layer_of(meta.get("hook_name")), dataset=meta.get("dataset_path"),
                  info={"hook_name": meta.get("hook_name"), "architecture": arch})


def _modern_cfg(cfg: dict) -> dict:
    """A pre-6.0 config in the 6.x shape: hook fields into metadata, TopK from activation_fn, as SAELens's own
    loader does."""
    meta = cfg.get("metadata")
    version = cfg.get("sae_lens_version") or (meta or {}).get("sae_lens_version")
    if version and str(version).split(".")[0].isdigit() and int(str(version).split(".")[0]) >= 6:
        return cfg
    cfg = dict(cfg)
    meta = dict(meta or {})
    for old, new in (("hook_point", "hook_name"), ("hook_name", "hook_name"), ("model_name", "model_name"),
                     ("dataset_path", "dataset_path")):
        if old in cfg and new not in meta:
            meta[new] = cfg[old]
    cfg["metadata"] = meta
    act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if act == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        cfg.update(architecture="topk", k=cfg["activation_fn_kwargs"]["k"])
    cfg.setdefault("architecture", "standard")
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def _refuse_unsupported(cfg: dict, where: str) -> None:
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise PatchSAEError(f"{where}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise PatchSAEError(f"{where}: normalize_activations={norm!r} rescales every token on its own; patchsae SAEs "
                            "read raw activations, so this SAE cannot be imported")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise PatchSAEError(f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention-head SAEs) "
                            "is not supported")


__all__ = ["CFG", "WEIGHTS", "SIDECAR", "is_saelens", "read_saelens", "write_saelens", "hook_name", "layer_of"]
