"""The one SAE trainer: Adam with linear warm-up then constant lr, unit-norm decoder rows (parallel gradient
removed before each step, rows renormalised after), dead-latent bookkeeping for ghost grads / AuxK, and
atomic checkpoints from which a killed run resumes to the same final weights.

Data comes from a token source with `sample(n)` (the first sample, for initialisation) and
`batches(batch_size, start_step)` (deterministic per step, so a resumed run sees the batches it would have).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from patchsae import PatchSAEError
from patchsae.sae.checkpoint import load_training_state, save_sae, save_training_state
from patchsae.sae.model import SAE, SAEConfig
from patchsae.utils import atomic_path


class TokenSource(Protocol):
    n_tokens: int

    def sample(self, n: int) -> torch.Tensor: ...

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[torch.Tensor]: ...


@dataclass(frozen=True)
class TrainConfig:
    total_tokens: int
    batch_tokens: int = 4096
    lr: float = 4e-4
    warmup_steps: int = 500
    seed: int = 0
    init_tokens: int = 20_000  # first sample for the geometric median and the input scale
    checkpoint_every: int = 250  # steps
    log_every: int = 25
    device: str = "cpu"

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_tokens)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_sae(sae_cfg: SAEConfig, cfg: TrainConfig, source: TokenSource, out_dir: str | Path,
              progress: bool = True, provenance: dict | None = None) -> SAE:
    """Train (or resume) an SAE into `out_dir`; returns it. Writes model.safetensors, config.json,
    checkpoint.safetensors and train_log.csv there. `provenance` (e.g. model and layer the activations came
    from) is stored in config.json so later stages can refuse a mismatched model."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.safetensors"
    info = {"sae": sae_cfg.to_json(), "train": asdict(cfg)}

    torch.manual_seed(cfg.seed)
    sae = SAE(sae_cfg).to(cfg.device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    since_fired_S = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=cfg.device)
    step = 0
    if ckpt.exists():
        step, since_fired_S, saved = load_training_state(ckpt, sae, opt)
        since_fired_S = since_fired_S.to(cfg.device)
        if saved != info:
            raise PatchSAEError(
                f"{ckpt} belongs to a run with another configuration; delete it or use a new run directory"
            )
    else:
        sae.init_from_sample(source.sample(cfg.init_tokens).to(cfg.device))
        sae.normalize_decoder()
    log_rows = _read_log(out_dir / "train_log.csv", step)

    bar = tqdm(total=cfg.total_steps, initial=step, desc="train SAE", unit="step", disable=not progress)
    batches = source.batches(cfg.batch_tokens, start_step=step)
    while step < cfg.total_steps:
        x_ND = next(batches).to(cfg.device, torch.float32)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps)
        dead_S = since_fired_S >= sae_cfg.dead_steps
        loss, parts = sae.loss(x_ND, dead_S)
        if not torch.isfinite(loss):
            raise PatchSAEError(
                f"SAE loss became {loss.item()} at step {step}; the last checkpoint ({ckpt.name}) is kept. "
                "Check the activations for NaNs or lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
        since_fired_S += 1
        since_fired_S[parts["fired_S"]] = 0
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            row = {"step": step, "tokens": step * cfg.batch_tokens, "loss": loss.item(),
                   "mse": parts["mse"].item(), "l0": parts["l0"].item(),
                   "dead_fraction": dead_S.float().mean().item()}
            log_rows.append(row)
            bar.set_postfix(mse=f"{row['mse']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            save_training_state(ckpt, sae, opt, since_fired_S, step, info)
            _write_log(out_dir / "train_log.csv", log_rows)
    bar.close()
    save_sae(out_dir, sae, {**(provenance or {}), "train": asdict(cfg), "tokens_trained": step * cfg.batch_tokens})
    return sae


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists() or up_to_step == 0:
        return []
    with path.open() as f:
        rows = [{k: int(v) if k in ("step", "tokens") else float(v) for k, v in row.items()}
                for row in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= up_to_step]


def _write_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
