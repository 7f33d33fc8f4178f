"""What every foreign SAE format shares: the plain parameterisation other libraries store, and the exact
conversion between it and ours.

Plain form (SAELens, sparsify, saev, the reference):  f = act((x - b_dec) W_enc + b_enc),  x_hat = f W_dec + b_dec,
on raw activations. Ours multiplies x by `input_scale` s first and divides x_hat by s afterwards, so folding s
into the weights (W_enc * s, b_dec / s, W_dec / s; b_enc and thresholds unchanged) gives the same codes:
(x - b_dec / s)(s W_enc) = (x s - b_dec) W_enc, and (f W_dec + b_dec) / s = f (W_dec / s) + b_dec / s.
Unfolding with a known s (our own exports record it) gives back unit-norm decoder rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.sae.model import SAE, SAEConfig

SIDECAR = "patchsae.json"  # our provenance beside a foreign-format export: model, layer, tokens, scale, config
PLAIN_ARCHS = ("relu", "topk", "jumprelu")  # what the plain form can express per token (BatchTopK = a JumpReLU)


@dataclass(frozen=True)
class PlainSAE:
    """An SAE in the plain form, float32 on CPU. threshold_S only for jumprelu (f = pre * [pre > theta])."""

    arch: str  # one of PLAIN_ARCHS
    W_enc_DS: torch.Tensor
    b_enc_S: torch.Tensor
    W_dec_SD: torch.Tensor
    b_dec_D: torch.Tensor
    k: int | None = None  # topk only
    threshold_S: torch.Tensor | None = None  # jumprelu only

    @property
    def d_model(self) -> int:
        return self.W_enc_DS.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc_DS.shape[1]


@dataclass(frozen=True)
class ForeignSAE:
    """An SAE read from some format, with whatever the format says about where it was trained."""

    sae: SAE
    format: str  # saelens, sparsify, saev, reference, patchsae
    source: str  # the path (or hf: spec) it came from
    model: str | None = None  # backbone name or path, as the file gives it
    layer: int | None = None  # hooked block index
    tokens: str | None = None  # all, cls or patch
    dataset: str | None = None
    info: dict = field(default_factory=dict)  # anything else worth keeping as provenance
    ours: bool = False  # written by patchsae (own folder or sidecar): model and dataset are specs we open


def plain_from_sae(sae: SAE) -> PlainSAE:
    """Our SAE with its input scale folded into the weights; BatchTopK becomes the JumpReLU it is at inference."""
    s = float(sae.input_scale)
    cfg = sae.cfg
    with torch.no_grad():
        W_enc, b_enc = sae.W_enc.detach().float().cpu() * s, sae.b_enc.detach().float().cpu().clone()
        W_dec, b_dec = sae.W_dec.detach().float().cpu() / s, sae.b_dec.detach().float().cpu() / s
        if cfg.arch == "jumprelu":
            return PlainSAE("jumprelu", W_enc, b_enc, W_dec, b_dec,
                            threshold_S=sae.log_threshold.detach().float().cpu().exp())
        if cfg.arch == "batchtopk":
            theta = torch.full((cfg.d_sae,), max(float(sae.threshold), 0.0))
            return PlainSAE("jumprelu", W_enc, b_enc, W_dec, b_dec, threshold_S=theta)
    return PlainSAE(cfg.arch, W_enc, b_enc, W_dec, b_dec, k=cfg.k if cfg.arch == "topk" else None)


def sae_from_plain(plain: PlainSAE, where: str, input_scale: float | None = None,
                   cfg: SAEConfig | None = None) -> SAE:
    """Our SAE computing the same codes. With `input_scale` (recorded by our own export) the scale is unfolded;
    with `cfg` (our config, also recorded) the original architecture and training settings come back, e.g.
    BatchTopK from its JumpReLU form."""
    check_plain(plain, where)
    s = 1.0 if input_scale is None else float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise PatchSAEError(f"{where}: recorded input scale {input_scale!r} is not a positive number")
    base = SAEConfig(d_model=plain.d_model, d_sae=plain.d_sae, arch=plain.arch, k=plain.k or 32)
    if cfg is not None and (cfg.d_model, cfg.d_sae) == (plain.d_model, plain.d_sae) and _compatible(cfg, plain):
        base = cfg
    scaled = (lambda t, f: t) if s == 1.0 else (lambda t, f: t * f)
    state = {"W_enc": scaled(plain.W_enc_DS, 1 / s), "b_enc": plain.b_enc_S, "W_dec": scaled(plain.W_dec_SD, s),
             "b_dec": scaled(plain.b_dec_D, s), "input_scale": torch.tensor(s)}
    if base.arch == "jumprelu":
        state["log_threshold"] = plain.threshold_S.clamp_min(0).log()  # theta <= 0 acts as ReLU: log 0 = -inf
    elif base.arch == "batchtopk":
        state["threshold"] = plain.threshold_S.max().clamp_min(0)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        sae = SAE(base)
    sae.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return sae.eval()


def _compatible(cfg: SAEConfig, plain: PlainSAE) -> bool:
    """Whether our recorded config describes these weights (a hand-edited file may not)."""
    if cfg.arch == "batchtopk":
        return plain.arch == "jumprelu" and bool((plain.threshold_S == plain.threshold_S[0]).all())
    return cfg.arch == plain.arch and (cfg.arch != "topk" or cfg.k == plain.k)


def check_plain(plain: PlainSAE, where: str) -> None:
    """One line naming the first tensor of the wrong shape or with non-finite values."""
    if plain.arch not in PLAIN_ARCHS:
        raise PatchSAEError(f"{where}: architecture {plain.arch!r} cannot be imported (supported: "
                            f"{', '.join(PLAIN_ARCHS)})")
    if plain.W_enc_DS.dim() != 2:
        raise PatchSAEError(f"{where}: W_enc has shape {tuple(plain.W_enc_DS.shape)}, expected (d_model, d_sae)")
    D, S = plain.W_enc_DS.shape
    want = {"W_enc": (plain.W_enc_DS, (D, S)), "b_enc": (plain.b_enc_S, (S,)), "W_dec": (plain.W_dec_SD, (S, D)),
            "b_dec": (plain.b_dec_D, (D,))}
    if plain.arch == "jumprelu":
        want["threshold"] = (plain.threshold_S, (S,))
    for name, (t, shape) in want.items():
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise PatchSAEError(f"{where}: {name} has shape {got}, expected {shape} for d_model={D}, d_sae={S}")
        if name != "threshold" and t.numel() and not all(map(math.isfinite, torch.aminmax(t))):
            raise PatchSAEError(f"{where}: {name} holds NaN or infinite values")
    if plain.arch == "topk" and not (plain.k and 0 < plain.k <= S):
        raise PatchSAEError(f"{where}: TopK k={plain.k} must be in 1..d_sae={S}")


def fold_b_dec_into_b_enc(W_enc_DS: torch.Tensor, b_enc_S: torch.Tensor, b_dec_D: torch.Tensor) -> torch.Tensor:
    """b_enc for our form when the source encodes x W_enc + b_enc without subtracting b_dec first
    (SAELens apply_b_dec_to_input=False, recent saev): x W + b = (x - b_dec) W + (b + b_dec W)."""
    return (b_enc_S.double() + b_dec_D.double() @ W_enc_DS.double()).float()


def read_json_file(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PatchSAEError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise PatchSAEError(f"{path}: {what} is not a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32, or one line saying why not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PatchSAEError(f"{path}: unreadable safetensors file ({exc})") from None


def need(state: dict, names: tuple[str, ...], where: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in state]
    if missing:
        raise PatchSAEError(f"{where}: missing tensors {missing} (has {sorted(state)})")
    return [state[n] for n in names]


def read_sidecar(folder: Path) -> dict:
    """Our provenance file beside an export, {} when absent."""
    path = Path(folder) / SIDECAR
    return read_json_file(path, "patchsae sidecar") if path.is_file() else {}


def finish(plain: PlainSAE, fmt: str, source: str, where: str, side: dict | None = None, cfg: SAEConfig | None = None,
           **known) -> ForeignSAE:
    """Build our SAE once: with the sidecar's recorded scale and config when there is one, and the sidecar's
    model/layer/tokens/dataset where the format itself said nothing (`known`)."""
    side = side or {}
    if isinstance(side.get("sae"), dict):
        try:
            cfg = SAEConfig(**side["sae"])
        except (TypeError, PatchSAEError):
            pass
    sae = sae_from_plain(plain, where, side.get("input_scale"), cfg)
    fields_ = {k: known.get(k) if known.get(k) is not None else side.get(k)
               for k in ("model", "layer", "tokens", "dataset")}
    return ForeignSAE(sae, fmt, source, **fields_, info={**known.get("info", {}), **(side.get("info") or {})},
                      ours=bool(side))


def sidecar_for(sae: SAE, model: str | None, layer: int | None, tokens: str | None, dataset: str | None,
                info: dict | None = None) -> dict:
    return {"input_scale": float(sae.input_scale), "sae": sae.cfg.to_json(), "model": model, "layer": layer,
            "tokens": tokens, "dataset": dataset, "info": info or {}}
