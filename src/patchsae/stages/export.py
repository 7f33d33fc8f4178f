"""`patchsae export`: write the run's SAE for other libraries: a SAELens folder, a sparsify folder (TopK only), or
a folder ready for `hf upload` (SAELens layout + our config + metrics + analysis statistics + model card).

The input scale is folded into the weights, so the exported SAE takes raw activations and gives our codes; a
`patchsae.json` sidecar keeps the scale, the SAE config and the run's config, so importing the folder back
gives this run's SAE and settings. OUT is written beside itself and renamed into place; an existing OUT is
refused unless --force.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patchsae.options import opt
from patchsae.runs import Run

NAME = "export"
HELP = "write the run's SAE as a SAELens or sparsify folder, or a Hugging Face hub folder with a model card"
RUN_HELP = "run directory with a trained SAE"


@dataclass(frozen=True)
class ExportOptions:
    format: str = opt(None, "saelens, sparsify (TopK SAEs) or hub (SAELens layout + config, metrics, analysis "
                      "statistics and README.md model card)", required=True,
                      choices=("saelens", "sparsify", "hub"), show_default=False)
    out: str = opt(None, "folder to write (must not exist unless --force)", required=True, show_default=False)
    force: bool = opt(False, "replace an existing OUT (only once the new folder is complete)")
    repo_id: str | None = opt(None, "hub only: OWNER/REPO to name in the model card's loading instructions")


OPTIONS = (ExportOptions,)


@dataclass(frozen=True)
class ExportReport:
    out: Path
    format: str
    files: tuple[str, ...]


def run(run_: Run, options: ExportOptions) -> ExportReport:
    from patchsae.sae.checkpoint import load_sae
    from patchsae.sae.formats import write_sae
    from patchsae.sae.formats.hub import write_hub
    from patchsae.utils import atomic_dir, read_json

    cfg = run_.load_config()
    sae, meta = load_sae(run_.sae_dir)
    where = dict(model=cfg.model, layer=meta.get("layer", cfg.layer), tokens=cfg.tokens, dataset=cfg.dataset)
    out = Path(options.out)
    with atomic_dir(out, options.force) as tmp:
        if options.format == "hub":
            metrics = read_json(run_.eval_metrics_file) if run_.eval_metrics_file.exists() else None
            stats = [p for p in (run_.analysis_dir / n for n in ("stats.safetensors", "latents.csv", "manifest.json"))
                     if p.exists()]
            train_info = {**(meta.get("train") or {}), "tokens_trained": meta.get("tokens_trained")}
            write_hub(tmp, sae, **where, run_config=cfg.to_json(), metrics=metrics, analysis_files=stats,
                      train_info={k: v for k, v in train_info.items() if v is not None}, repo_id=options.repo_id)
        else:
            write_sae(sae, tmp, options.format, **where, info={"run_config": cfg.to_json()})
    return ExportReport(out, options.format, tuple(sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                                          if p.is_file())))


def cli(args) -> None:
    from patchsae.cli import given

    r = run(Run(args.run), ExportOptions(**given(args, ExportOptions)))
    print(f"wrote {r.format} export to {r.out}: {', '.join(r.files)}")
