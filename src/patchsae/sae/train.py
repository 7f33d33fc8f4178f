"""The one SAE trainer: Adam with linear warm-up then constant lr, unit-norm decoder rows (parallel gradient
removed before each step, rows renormalised after), dead-latent bookkeeping for ghost grads / AuxK, and
atomic checkpoints from which a killed run resumes to the same final weights.

Distributed (torchrun): every rank trains on its slice of each global batch; gradients are averaged with one
all-reduce per parameter, weighted by each rank's token count, so the step equals the one-process step on the
global batch, and the few batch statistics of the losses are reduced the same way (sae.losses.BatchStats).
Firing counts are all-reduced, so dead-latent bookkeeping, ghost grads / AuxK and the decoder renormalisation
agree on every rank; ranks start from rank 0's weights and stay identical. Rank 0 alone writes checkpoints and
logs, the others wait at a barrier, and any rank resumes from the same checkpoint.

Data comes from a token source with `sample(n)` (the first sample, for initialisation) and
`batches(batch_size, start_step)` (deterministic per step, so a resumed run sees the batches it would have).
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from patchsae import PatchSAEError
from patchsae.dist import Dist
from patchsae.sae.checkpoint import load_training_state, save_sae, save_training_state
from patchsae.sae.losses import BatchStats
from patchsae.sae.model import SAE, SAEConfig
from patchsae.utils import atomic_path


class TokenSource(Protocol):
    n_tokens: int

    def sample(self, n: int) -> torch.Tensor: ...

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Rank's slice of each global batch of batch_size tokens. A source that knows which rows are CLS
        tokens also accepts `with_cls=True` and then yields (x_ND, cls_N) pairs, cls_N (tokens,) bool: the
        trainer asks for them only when the objective weights CLS rows (SAEConfig.mse_cls_coefficient)."""


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
    device: str = "cpu"  # "cuda" is each rank's own GPU in a distributed run
    # precision of the SAE's float32 matmuls (weights, gradients and Adam stay fp32): "fp32" exact; "tf32"
    # TF32 tensor cores on CUDA (no change on CPU); "bf16" bf16 products (GPU tensor cores, oneDNN/AMX on CPU)
    sae_dtype: str = "fp32"

    def __post_init__(self):
        if self.sae_dtype not in MATMUL_PRECISION:
            raise PatchSAEError(f"unknown SAE matmul dtype {self.sae_dtype!r} (choose {', '.join(MATMUL_PRECISION)})")

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_tokens)


MATMUL_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "medium"}  # torch.set_float32_matmul_precision


@contextlib.contextmanager
def matmul_precision(sae_dtype: str):
    """Run the block with float32 matmuls at `sae_dtype`'s precision, then restore the previous setting (it is
    process-wide state)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(MATMUL_PRECISION[sae_dtype])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def make_optimizer(sae: SAE, lr: float) -> torch.optim.Adam:
    """Adam with PyTorch's fused kernel (one pass over each parameter, its gradient and both moments; about
    half the time of the multi-tensor version on CPU at 768 -> 49,152). Exact resume relies on
    sae.checkpoint restoring the moments in each parameter's own memory layout."""
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_sae(sae_cfg: SAEConfig, cfg: TrainConfig, source: TokenSource, out_dir: str | Path,
              progress: bool = True, provenance: dict | None = None, dist: Dist = Dist(),
              tracker=None) -> SAE:
    """Train (or resume) an SAE into `out_dir`; returns it. Writes model.safetensors, config.json,
    checkpoint.safetensors and train_log.csv there. `provenance` (e.g. model and layer the activations came
    from) is stored in config.json so later stages can refuse a mismatched model. Under torchrun every rank
    calls it with its `dist`. `tracker` (sae.tracking) receives every log row's numbers: loss and its parts, L0,
    dead fraction and learning rate; under torchrun every rank passes one (the others a NoTracker) or none does."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.safetensors"
    info = {"sae": sae_cfg.to_json(), "train": asdict(cfg)}
    device = dist.device(cfg.device)

    torch.manual_seed(cfg.seed)
    sae = SAE(sae_cfg).to(device)
    opt = make_optimizer(sae, cfg.lr)
    since_fired_S = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
    step = 0
    if ckpt.exists():
        step, since_fired_S, saved = load_training_state(ckpt, sae, opt)
        since_fired_S = since_fired_S.to(device)
        if "train" in saved:  # settings added since the checkpoint was written take their defaults
            saved["train"] = {**asdict(TrainConfig(total_tokens=0)), **saved["train"]}
        if saved != info:
            raise PatchSAEError(
                f"{ckpt} belongs to a run with another configuration; delete it or use a new run directory"
            )
    else:
        sae.init_from_sample(source.sample(cfg.init_tokens).to(device))
        sae.normalize_decoder()
        for t in sae.state_dict().values():
            dist.broadcast(t)
    log_rows = _read_log(out_dir / "train_log.csv", step) if dist.is_main else []

    bar = tqdm(total=cfg.total_steps, initial=step, desc="train SAE", unit="step",
               disable=not (progress and dist.is_main))
    batches = _batches(source, sae_cfg, cfg.batch_tokens, step, dist)
    with matmul_precision(cfg.sae_dtype):
        while step < cfg.total_steps:
            x_ND, cls_N = next(batches)
            x_ND, cls_N = x_ND.to(device, torch.float32), None if cls_N is None else cls_N.to(device)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps)
            dead_S = since_fired_S >= sae_cfg.dead_steps
            loss, parts, stats = train_step(sae, opt, x_ND, since_fired_S, dist, cls_N)
            if loss is None:
                raise PatchSAEError(
                    f"SAE loss became non-finite at step {step}; the last checkpoint ({ckpt.name}) is kept. "
                    "Check the activations for NaNs or lower the learning rate"
                )
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                row = {"step": step, "tokens": step * cfg.batch_tokens, "loss": stats.mean(loss.detach()).item(),
                       "mse": stats.mean(parts["mse"]).item(), "l0": stats.mean(parts["l0"]).item(),
                       "dead_fraction": dead_S.float().mean().item()}
                log_rows.append(row)
                _track(tracker, row, parts, stats, opt.param_groups[0]["lr"])
                bar.set_postfix(mse=f"{row['mse']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                if dist.is_main:
                    save_training_state(ckpt, sae, opt, since_fired_S, step, info)
                    _write_log(out_dir / "train_log.csv", log_rows)
                dist.barrier()
    bar.close()
    if dist.is_main:
        save_sae(out_dir, sae, {**(provenance or {}), "train": asdict(cfg), "tokens_trained": step * cfg.batch_tokens})
    dist.barrier()
    return sae


def _batches(source: TokenSource, sae_cfg: SAEConfig, batch_tokens: int, step: int,
             dist: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(x_ND, cls_N) per step; cls_N None unless the objective weights CLS rows."""
    where = dict(start_step=step, rank=dist.rank, world=dist.world)
    if sae_cfg.mse_cls_coefficient == 1.0:
        return ((x_ND, None) for x_ND in source.batches(batch_tokens, **where))
    try:
        return source.batches(batch_tokens, with_cls=True, **where)
    except TypeError:
        raise PatchSAEError(f"mse_cls_coefficient={sae_cfg.mse_cls_coefficient} needs to know which tokens are "
                            f"CLS, and this token source ({type(source).__name__}) does not say") from None


def _track(tracker, row: dict, parts: dict, stats: BatchStats, lr: float) -> None:
    """One log row to the tracker as train/* scalars, with the loss parts the architecture has (l1, ghost, aux).
    Under torchrun every rank passes a tracker (rank 0 the real one) so that all take part in the reductions."""
    if tracker is None:
        return
    extra = {f"train/{k}": stats.mean(parts[k]).item() for k in ("l1", "ghost", "aux") if k in parts}
    tracker.log(row["step"], {**{f"train/{k}": v for k, v in row.items() if k != "step"}, **extra, "train/lr": lr})


def train_step(sae: SAE, opt: torch.optim.Optimizer, x_ND: torch.Tensor, since_fired_S: torch.Tensor,
               dist: Dist = Dist(), cls_N: torch.Tensor | None = None):
    """One optimisation step on this rank's tokens x_ND (cls_N: which are CLS tokens, if the objective weights
    them) (what `benchmarks/` times): loss, gradients
    all-reduced across ranks, parallel decoder component removed, Adam, decoder rows renormalised, firing
    counters updated in place. Returns (loss, parts, stats), loss None (and nothing updated) if it is not
    finite on some rank."""
    dead_S = since_fired_S >= sae.cfg.dead_steps
    share, stats = _batch_share(dist, len(x_ND), x_ND.device)
    loss, parts = sae.loss(x_ND, dead_S, stats, cls_N)
    if not dist.all_reduce(torch.isfinite(loss.detach()).float().reshape(1), "min").item():
        return None, parts, stats
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if dist.active:
        for p in sae.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad.mul_(share))
    sae.remove_parallel_grads()
    opt.step()
    sae.normalize_decoder()
    since_fired_S += 1
    since_fired_S[dist.all_reduce(parts["fired_S"].int(), "max").bool()] = 0
    return loss, parts, stats


def _batch_share(dist: Dist, n_local: int, device) -> tuple[float, BatchStats]:
    """This rank's fraction of the global batch's tokens, and the BatchStats that turn its means over its own
    tokens into means over the global batch (weighted by the fraction, summed over ranks)."""
    if not dist.active:
        return 1.0, BatchStats()
    n_global = int(dist.all_reduce(torch.tensor([n_local], dtype=torch.float64, device=device)).item())
    share = n_local / n_global
    return share, BatchStats(mean=lambda t: dist.all_reduce(t.detach() * share),
                             min=lambda t: dist.all_reduce(t.detach().clone(), "min"))


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
