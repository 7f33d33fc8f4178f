"""SAE files: `model.safetensors` + `config.json` for a finished SAE, and one `checkpoint.safetensors` holding
everything a killed training run needs to continue (weights, Adam moments, dead-latent counters, step).

Every file is written to a temporary name and renamed, so a kill leaves the previous version intact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from patchsae import PatchSAEError
from patchsae.sae.model import SAE, SAEConfig
from patchsae.utils import dataclass_from_json, one_line, read_json_file, write_json, write_safetensors


def save_sae(folder: str | Path, sae: SAE, extra: dict | None = None) -> None:
    folder = Path(folder)
    digest = write_safetensors(folder / "model.safetensors",
                               {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()})
    # written last, naming the weights it belongs to: a save cut between the two files is never taken as an SAE
    write_json(folder / "config.json", {"sae": sae.cfg.to_json(), "weights_digest": digest, **(extra or {})})


def load_sae(folder: str | Path, d_model: int | None = None) -> tuple[SAE, dict]:
    """Load an SAE; if `d_model` is given, refuse one trained on activations of another width. The config and
    the file's tensor table are checked before any weight is allocated (a config may declare any size)."""
    folder = Path(folder)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise PatchSAEError(f"no trained SAE in {folder} (expected config.json and model.safetensors)")
    meta = read_json_file(cfg_file, "SAE config")
    if not isinstance(meta, dict) or "sae" not in meta or not isinstance(meta.get("weights_digest", ""), str):
        raise PatchSAEError(f"{cfg_file}: unreadable SAE config (no 'sae' object, or a bad 'weights_digest')")
    cfg = dataclass_from_json(SAEConfig, meta["sae"], f"{cfg_file} 'sae'")
    if cfg.d_model < 1 or cfg.d_sae < 1:
        raise PatchSAEError(f"{cfg_file}: d_model and d_sae must be positive, not {cfg.d_model} and {cfg.d_sae}")
    if d_model is not None and cfg.d_model != d_model:
        raise PatchSAEError(
            f"SAE in {folder} was trained on width {cfg.d_model}, but the model's hooked block has width {d_model}"
        )
    with torch.device("meta"):  # the expected tensor table, without allocating d_model x d_sae floats
        expected = {k: tuple(v.shape) for k, v in SAE(cfg).state_dict().items()}
    state = read_tensors(weights, expected, f"does not match its config (d_model={cfg.d_model}, d_sae={cfg.d_sae})",
                         digest=meta.get("weights_digest"))
    sae = SAE(cfg)
    sae.load_state_dict(state)
    return sae, meta


def read_tensors(path: Path, expected: dict[str, tuple], mismatch: str, counters: tuple[str, ...] = (),
                 digest: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file that must hold exactly `expected` (name -> shape): finite floats, or
    integers for the names in `counters`; the table in its header is compared before any tensor is read.
    `digest`: the one a config written beside the file recorded, which the file's header must repeat."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if digest is not None and (f.metadata() or {}).get("digest") != digest:
                raise PatchSAEError(f"{path} is not the file its config.json was saved with (a save was cut "
                                    "short, or files were mixed); save or train again")
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if got != expected:
                bad = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
                raise PatchSAEError(f"{path} {mismatch}: " + ", ".join(
                    f"{k} {got.get(k)} vs expected {expected.get(k)}" for k in bad[:5]))
            state = {k: f.get_tensor(k) for k in expected}
    except PatchSAEError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PatchSAEError(f"{path}: unreadable safetensors file ({one_line(exc)})") from None
    for k, v in state.items():
        if k in counters:
            if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
                raise PatchSAEError(f"{path}: tensor {k} holds {v.dtype}, not integer counts")
            continue
        if not v.is_floating_point():
            raise PatchSAEError(f"{path}: tensor {k} holds {v.dtype}, not floating-point weights")
        if not torch.isfinite(v).all():
            raise PatchSAEError(f"{path}: tensor {k} holds non-finite values (NaN or infinity)")
    return state


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
    write_safetensors(path, tensors, meta)


def load_training_state(path: str | Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, torch.Tensor, dict]:
    """Restore weights and optimiser in place; return (step, since_fired_S, info). Every tensor's name and shape
    and every metadata value is checked first, so a damaged checkpoint is one error line, never a run that
    crashes (or trains on garbage) steps later."""
    params = dict(sae.named_parameters())
    expected = {f"model.{k}": tuple(v.shape) for k, v in sae.state_dict().items()}
    expected["since_fired"] = (sae.cfg.d_sae,)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
        step, opt_meta, info = int(meta["step"]), json.loads(meta["opt"]), json.loads(meta["info"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as exc:
        raise PatchSAEError(f"{path}: unreadable training checkpoint ({one_line(exc)})") from None
    if step < 0 or not isinstance(info, dict) or not isinstance(opt_meta, dict) or not all(
            k.rsplit(".", 1)[0] in params and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
            and float(v).is_integer() for k, v in opt_meta.items()):
        raise PatchSAEError(f"{path}: unreadable training checkpoint (bad step, optimiser or info metadata)")
    for n, p in params.items():  # Adam's state of a parameter is all of (step, both moments) or nothing
        has = [f"opt.{n}.exp_avg" in names, f"opt.{n}.exp_avg_sq" in names, f"{n}.step" in opt_meta]
        if any(has) and not all(has):
            raise PatchSAEError(f"{path}: unreadable training checkpoint (incomplete optimiser state of {n})")
        if all(has):
            expected.update({f"opt.{n}.exp_avg": tuple(p.shape), f"opt.{n}.exp_avg_sq": tuple(p.shape)})
    tensors = read_tensors(Path(path), expected, "does not match this SAE's shape", ("since_fired",))
    sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    # through load_state_dict, which gives each optimiser implementation (fused or not) its own state layout
    opt_state = opt.state_dict()
    for i, name in enumerate(params):
        st = {key: tensors[f"opt.{name}.{key}"] for key in ("exp_avg", "exp_avg_sq") if f"opt.{name}.{key}" in tensors}
        if f"{name}.step" in opt_meta:
            st["step"] = torch.tensor(float(opt_meta[f"{name}.step"]), dtype=torch.float32)
        if st:
            opt_state["state"][i] = st
    opt.load_state_dict(opt_state)
    _match_param_layout(opt)
    return step, tensors["since_fired"].long(), info


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
