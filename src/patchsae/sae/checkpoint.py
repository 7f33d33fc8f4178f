"""SAE files: `model.safetensors` + `config.json` for a finished SAE, and one `checkpoint.safetensors` holding
everything a killed training run needs to continue (weights, Adam moments, dead-latent counters, step).

Every file is written to a temporary name and renamed, so a kill leaves the previous version intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from patchsae import PatchSAEError
from patchsae.sae.model import SAE, SAEConfig
from patchsae.utils import atomic_path, read_json, write_json


def save_sae(folder: str | Path, sae: SAE, extra: dict | None = None) -> None:
    folder = Path(folder)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp))
    write_json(folder / "config.json", {"sae": sae.cfg.to_json(), **(extra or {})})


def load_sae(folder: str | Path, d_model: int | None = None) -> tuple[SAE, dict]:
    """Load an SAE; if `d_model` is given, refuse one trained on activations of another width."""
    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise PatchSAEError(f"no trained SAE in {folder} (expected config.json and model.safetensors)")
    try:
        meta = read_json(cfg_file)
        cfg = SAEConfig(**meta["sae"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PatchSAEError(f"{cfg_file}: unreadable SAE config ({type(exc).__name__}: {exc})") from None
    if d_model is not None and cfg.d_model != d_model:
        raise PatchSAEError(
            f"SAE in {folder} was trained on width {cfg.d_model}, but the model's hooked block has width {d_model}"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise PatchSAEError(f"{weights}: unreadable safetensors file ({exc})") from None
    sae = SAE(cfg)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise PatchSAEError(
            f"{weights} does not match its config (d_model={cfg.d_model}, d_sae={cfg.d_sae}): "
            + ", ".join(f"{k} {got.get(k)} vs expected {expected.get(k)}" for k in bad)
        )
    sae.load_state_dict(state)
    return sae, meta


def save_training_state(path: str | Path, sae: SAE, opt: torch.optim.Optimizer, since_fired_S: torch.Tensor,
                        step: int, info: dict) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    names = {id(p): n for n, p in sae.named_parameters()}
    opt_meta = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, val in st.items():
                if torch.is_tensor(val) and val.dim() > 0:
                    tensors[f"opt.{names[id(p)]}.{key}"] = val.contiguous().cpu()
                else:
                    opt_meta[f"{names[id(p)]}.{key}"] = float(val)
    tensors["since_fired"] = since_fired_S.contiguous().cpu()
    meta = {"step": str(step), "opt": json.dumps(opt_meta), "info": json.dumps(info)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_training_state(path: str | Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, torch.Tensor, dict]:
    """Restore weights and optimiser in place; return (step, since_fired_S, info)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        step, opt_meta, info, since_fired = int(meta["step"]), json.loads(meta["opt"]), json.loads(meta["info"]), \
            tensors["since_fired"]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as exc:
        raise PatchSAEError(f"{path}: unreadable training checkpoint ({type(exc).__name__}: {exc})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        sae.load_state_dict(model_state)
    except RuntimeError as exc:
        raise PatchSAEError(f"{path}: checkpoint does not match this SAE's shape ({str(exc).splitlines()[-1].strip()})") from None
    # through load_state_dict, which gives each optimiser implementation (fused or not) its own state layout
    opt_state = opt.state_dict()
    for i, (name, p) in enumerate(sae.named_parameters()):
        st = {key: tensors[f"opt.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq") if f"opt.{name}.{key}" in tensors}
        if f"{name}.step" in opt_meta:
            st["step"] = torch.tensor(opt_meta[f"{name}.step"], dtype=torch.float32)
        if st:
            opt_state["state"][i] = st
    opt.load_state_dict(opt_state)
    _match_param_layout(opt)
    return step, since_fired, info


def _match_param_layout(opt: torch.optim.Optimizer) -> None:
    """Give every restored per-parameter state tensor its parameter's strides. A checkpoint stores tensors
    contiguous, but W_enc is a transposed (column-major) parameter, and the fused Adam kernel walks a parameter,
    its gradient and its moments as flat memory: moments restored row-major were paired with the wrong entries,
    so a resumed run diverged. The multi-tensor Adam indexes by shape and never saw the difference."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, val in st.items():
                if torch.is_tensor(val) and val.shape == p.shape and val.stride() != p.stride():
                    st[key] = torch.empty_strided(p.shape, p.stride(), dtype=val.dtype, device=val.device).copy_(val)
