"""`patchsae ablate --root DIR`: the paper's Table 2 ablations on the current model, one run directory per row
under DIR (runs/ablation.py names the rows: the hooked block at the depths of layers 2, 5, 8 and 11 of 12, CLS
token only, expansion x32 / x64 / x128, lambda 0 / default / 10x; each changes one setting of the paper's recipe).

One forward pass over the training split caches every block the rows need (DIR/activations, a multi-layer run);
each row's run links its cache there, trains for the same number of tokens (--budget-tokens), and is evaluated
with `evaluate`'s metrics. Rerunning skips what is done and resumes a row's training from its checkpoint. Writes
DIR/ablation.md (the table, beside the paper's rows) and DIR/ablation.json."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.runs import Run, RunConfig
from patchsae.runs.ablation import AblationRow
from patchsae.stages import evaluate

NAME = "ablate"
HELP = ("the paper's Table 2 ablations (hooked block, CLS only, expansion, lambda) on the current model: one run "
        "per row under --root, one shared cache, one table (DIR/ablation.md)")
RUN_HELP = None  # takes --root, a folder of runs


@dataclass(frozen=True)
class AblateOptions:
    root: str = opt(None, "folder that receives one run directory per row, the shared cache (activations/) and "
                    "the table (ablation.md, ablation.json)", required=True, show_default=False)
    budget_tokens: int | None = opt(None, "training tokens per row, the same for every row (default: one pass "
                                    "over the training split's tokens, CLS and patches)", metavar="N",
                                    show_default=False)


# the run settings a user may set for every row; the ones the ablation varies (block, tokens, expansion, arch,
# objective) are the recipe's
RUN_FIELDS = ("model", "act", "dataset", "dataset_path", "train_split", "eval_split", "max_train_images",
              "max_eval_images", "l1_coeff", "mse_cls_coefficient", "lr", "warmup_steps", "batch_tokens", "seed",
              "device", "batch_images", "dtype", "sae_dtype")
OPTIONS = (AblateOptions, (RunConfig, RUN_FIELDS), evaluate.EvaluateOptions)
MEMORY_SHARE = 0.8  # a row trains only if its estimated memory fits in this share of what is available


@dataclass(frozen=True)
class RowResult:
    row: AblationRow
    run: Path | None  # None when the row did not run
    metrics: dict | None  # its eval/metrics.json
    skipped: str | None  # why it did not run
    seconds: float  # training and evaluation in this call (0 for what was already done)


@dataclass(frozen=True)
class AblateReport:
    root: Path
    table: str  # DIR/ablation.md as written
    rows: list[RowResult]
    budget_tokens: int
    seconds: float


def run(root: str | Path, given: dict, budget_tokens: int | None = None, cl_batch_size: int = 128,
        progress: bool = True) -> AblateReport:
    from patchsae.runs.ablation import base_config, rows
    from patchsae.stages.setup import model_for

    if budget_tokens is not None and budget_tokens <= 0:  # before the model is opened and the cache built
        raise PatchSAEError(f"--budget-tokens must be positive, not {budget_tokens}")
    t0, root = time.time(), Path(root)
    base = base_config(given.get("model"), given)
    model = model_for(base)
    plan = rows(base, model.n_layers, has_cls="cls" in model.layout().kinds())
    shared = _shared_cache(root, plan, model, progress)
    if budget_tokens is None:
        budget_tokens = _row_tokens(shared, plan[0].cfg)
    available = available_bytes(base.device)
    results = [_row(root, row, shared, budget_tokens, model, cl_batch_size, available, progress) for row in plan]
    text = _write_table(root, base, results, budget_tokens, model)
    return AblateReport(root, text, results, budget_tokens, time.time() - t0)


def _shared_cache(root: Path, plan: list[AblationRow], model, progress: bool) -> Run:
    """DIR/activations: a multi-layer run caching every block of the plan in one pass (kept when complete)."""
    from patchsae.stages import cache

    blocks = list(dict.fromkeys(r.cfg.layer for r in plan))
    cfg = replace(plan[0].cfg, layers=tuple(map(str, blocks)))
    shared = Run(root / "activations")
    _init(shared, cfg)
    print(f"caching blocks {', '.join(map(str, blocks))} of {cfg.model} on {cfg.dataset}/{cfg.train_split} "
          f"in {shared.path}", file=sys.stderr)
    cache.run_layers(shared, model, progress)
    return shared


def _init(run_: Run, cfg: RunConfig) -> None:
    """Write the run's config, or refuse one that holds results of another configuration."""
    run_.init(cfg, cfg.to_json())


def _row_tokens(shared: Run, cfg: RunConfig) -> int:
    from patchsae.activations.cache import ActivationCache
    from patchsae.activations.tokens import CachedTokens

    return CachedTokens(ActivationCache(_cache_of(shared, cfg)), cfg.tokens).n_tokens


def _cache_of(shared: Run, cfg: RunConfig) -> Path:
    return Run(shared.path, cfg.layer).cache_dir(cfg.train_split)


def _row(root: Path, row: AblationRow, shared: Run, budget_tokens: int, model, cl_batch_size: int,
         available: int, progress: bool) -> RowResult:
    from patchsae.runs.ablation import training_bytes
    from patchsae.stages import train
    from patchsae.utils import read_json

    if row.unavailable:
        print(f"{row.name}: skipped: {row.unavailable}", file=sys.stderr)
        return RowResult(row, None, None, row.unavailable, 0.0)
    run_ = Run(root / row.name)
    sae_config = run_.sae_dir / "config.json"  # save_sae writes it after the weights: it marks a finished SAE
    need = training_bytes(row.cfg, model.d_model)
    if not sae_config.exists() and need > MEMORY_SHARE * available:
        why = (f"training needs about {need / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of the "
               f"{available / 2**30:.1f} GiB available")
        print(f"{row.name}: skipped: {why}", file=sys.stderr)
        return RowResult(row, None, None, why, 0.0)
    t0 = time.time()
    _init(run_, replace(row.cfg, epochs=budget_tokens / _row_tokens(shared, row.cfg)))
    _link(run_.cache_dir(row.cfg.train_split), _cache_of(shared, row.cfg))
    if not sae_config.exists():
        print(f"{row.name}: training ({row.setting})", file=sys.stderr)
        train.run(run_, progress)
    metrics_file = run_.eval_metrics_file  # evaluate writes it last
    if not metrics_file.exists() or metrics_file.stat().st_mtime < sae_config.stat().st_mtime:
        print(f"{row.name}: evaluating", file=sys.stderr)
        evaluate.run(run_, model, progress, cl_batch_size)
    return RowResult(row, run_.path, read_json(metrics_file), None, time.time() - t0)


def _link(link: Path, target: Path) -> None:
    """The row's cache folder as a relative link to the shared one; kept if it is there already, or if it is a
    folder of its own (a copy of the root made without keeping links)."""
    if link.is_symlink() and link.resolve() != target.resolve():
        raise PatchSAEError(f"{link} links to {link.resolve()}, not to the shared cache {target}; use a new --root")
    if link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
    os.replace(tmp, link)


def available_bytes(device: str) -> int:
    """Memory free for training: the GPU's free memory on cuda, else the kernel's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _write_table(root: Path, base: RunConfig, results: list[RowResult], budget_tokens: int, model) -> str:
    from patchsae.analysis.paper import ablation_table
    from patchsae.utils import atomic_path, write_json

    default = results[0].row.cfg
    lines = [f"# Table 2 ablations: {base.model} on {base.dataset}/{base.train_split}, evaluated on "
             f"{base.eval_split}", "",
             f"Recipe: ReLU + L1, reference objective, x{default.expansion}, lambda {default.l1_coeff:g}, lr "
             f"{default.lr:g}, {default.batch_tokens} tokens a step, {default.warmup_steps} warm-up steps; "
             f"{budget_tokens:,} training tokens per row; block {default.layer} of {model.n_layers} stands for the "
             "paper's layer 11 of 12. Each row changes one setting. MSE is the reference's normalised MSE; CL is "
             "CLIP's contrastive loss with the hooked block's CLS token replaced by its reconstruction, and "
             "unedited.", "",
             *ablation_table([(r.row.setting, r.metrics, r.row.paper) for r in results])]
    skipped = [f"- {r.row.setting}: {r.skipped}" for r in results if r.skipped]
    if skipped:
        lines += ["", "Rows not run:", "", *skipped]
    text = "\n".join(lines) + "\n"
    with atomic_path(root / "ablation.md") as tmp:
        tmp.write_text(text)
    write_json(root / "ablation.json", {
        "model": base.model, "dataset": base.dataset, "budget_tokens": budget_tokens,
        "rows": [{"name": r.row.name, "setting": r.row.setting, "group": r.row.group,
                  "run": None if r.run is None else str(r.run), "skipped": r.skipped, "paper_row": r.row.paper,
                  "seconds": round(r.seconds, 1), "metrics": r.metrics} for r in results]})
    return text


def cli(args) -> None:
    from patchsae.cli import given

    opts = AblateOptions(**given(args, AblateOptions))
    ev = evaluate.EvaluateOptions(**given(args, evaluate.EvaluateOptions))
    report = run(opts.root, given(args, RunConfig, RUN_FIELDS), opts.budget_tokens, ev.cl_batch_size)
    print(report.table, end="")
    print(f"wrote {report.root}/ablation.md and ablation.json ({len(report.rows)} rows, {report.seconds:.0f} s)")
