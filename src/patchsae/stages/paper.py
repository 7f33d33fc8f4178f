"""`patchsae paper --run DIR`: the run's numbers beside the paper's, in the paper's layout: Table 2's row (from
DIR/eval/metrics.json), Fig 5b's rows (from DIR/classify) and Table 1's rows (from DIR/adapt-study). Prints the
tables and writes DIR/paper/tables.md; every row it could not fill is named with the reason and the command
that fills it. Reads only what the stages wrote: no model is opened."""

from __future__ import annotations

import csv
from dataclasses import dataclass

from patchsae import PatchSAEError
from patchsae.runs import Run

NAME = "paper"
HELP = ("the run's numbers beside the paper's Table 2, Fig 5b and Table 1, in the paper's layout, naming every row "
        "it could not fill; DIR/paper/tables.md")
RUN_HELP = "run directory (any stages run so far)"
OPTIONS = ()


@dataclass(frozen=True)
class PaperReport:
    text: str  # DIR/paper/tables.md as written
    missing: list[str]  # every row not filled, with why


def _json_or_none(path):
    from patchsae.utils import read_json

    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as exc:
        raise PatchSAEError(f"{path}: not valid JSON ({exc})") from None


def setting(cfg, sae_meta: dict | None) -> str:
    """Our Table 2 row's label: model, block (as trained, from the SAE's config when there is one), tokens, SAE."""
    sae = f"{cfg.arch}" + (f" ({cfg.objective} objective, lambda {cfg.l1_coeff:g})" if cfg.arch == "relu" else "")
    layer = (sae_meta or {}).get("layer", cfg.layer)
    return f"{cfg.model}, block {layer}, {cfg.tokens} tokens, x{cfg.expansion} {sae}"


def classify_rows(run: Run) -> tuple[list[dict] | None, dict | None]:
    path = run.classify_dir / "metrics.csv"
    manifest = _json_or_none(run.classify_dir / "manifest.json")
    if not path.exists() or manifest is None:
        return None, None
    with path.open(newline="") as f:
        return list(csv.DictReader(f)), manifest


def run(run: Run) -> PaperReport:
    from patchsae.analysis import paper
    from patchsae.stages.adapt_study import table_rows
    from patchsae.utils import atomic_path

    cfg = run.load_config()
    metrics = _json_or_none(run.eval_metrics_file)
    t2, miss2 = paper.table2(metrics, setting(cfg, _json_or_none(run.sae_dir / "config.json")))
    f5, miss5 = paper.fig5b(*classify_rows(run))
    study = _json_or_none(run.adapt_study_dir / "summary.json")
    t1, miss1 = paper.table1(table_rows(study["results"]) if study else None,
                             study.get("options", {}).get("compare") if study else None)
    missing = miss2 + miss5 + miss1
    lines = [f"# {run.path}: our numbers beside the paper's (PatchSAE, Lim et al., ICLR 2025)", "",
             "## Table 2: SAE training (MSE = the reference's normalised MSE; CL = CLIP's contrastive loss with the "
             "hooked block's CLS token replaced by its reconstruction, and unedited)", "", *t2, "",
             "## Fig 5b: top-k masking, accuracy % (the paper plots these; it prints no numbers)", "", *f5, "",
             "## Table 1: MaPLe base-to-novel, and average latents per class in each group (base / novel)", "", *t1,
             "", "## Rows not filled", "", *(f"- {m}" for m in missing)]
    text = "\n".join(lines) + "\n"
    with atomic_path(run.paper_dir / "tables.md") as tmp:
        tmp.write_text(text)
    return PaperReport(text, missing)


def cli(args) -> None:
    run_ = Run(args.run)
    report = run(run_)
    print(report.text, end="")
    print(f"wrote {run_.paper_dir / 'tables.md'}")
