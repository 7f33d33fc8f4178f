"""`patchsae import`: make a run from an SAE trained elsewhere (SAELens, sparsify, saev, the reference PatchSAE
checkpoint, this project's own folder, or hf:OWNER/REPO[/SUB]); every later stage then works on it.

The run's config takes the model, block, token set and dataset from the SAE's own files where they say, from
--model/--layer/--dataset otherwise, and the SAE settings (arch, k, width) from the SAE. The model is opened to
check that the SAE's width and block fit it. DIR/sae/config.json records where the SAE came from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.runs import Run, RunConfig, start_config
from patchsae.stages.setup import model_for

NAME = "import"
HELP = ("make a run from an SAE trained elsewhere: a SAELens or sparsify folder, a saev .pt, the reference "
        "PatchSAE checkpoint, a patchsae SAE folder or run, or hf:OWNER/REPO[/SUBFOLDER]")
RUN_HELP = "new run directory for the imported SAE"
# the run settings an import may set; the SAE's own settings come from the SAE
RUN_FIELDS = ("model", "act", "layer", "tokens", "dataset", "dataset_path", "train_split", "eval_split",
              "max_eval_images", "device", "batch_images")


@dataclass(frozen=True)
class ImportOptions:
    sae: str = opt(None, "the SAE: a folder, a .pt file, or hf:OWNER/REPO[/SUBFOLDER]", required=True,
                   metavar="SRC", show_default=False)
    format: str | None = opt(None, "the SAE's format when detection from its files is not wanted",
                             choices=("saelens", "sparsify", "saev", "reference", "patchsae"))


OPTIONS = (ImportOptions, (RunConfig, RUN_FIELDS))


@dataclass(frozen=True)
class ImportReport:
    run: Path
    format: str
    source: str
    model: str
    layer: int  # the resolved hooked block
    tokens: str
    arch: str
    d_model: int
    d_sae: int


def run(run_: Run, source: str, fmt: str | None = None, overrides: dict | None = None) -> ImportReport:
    from patchsae.sae.checkpoint import save_sae
    from patchsae.sae.formats import check_fits, read_sae

    overrides = dict(overrides or {})
    if run_.sae_weights.exists() or run_.has_results():
        raise PatchSAEError(f"{run_.path} already holds results; import into a new run directory")
    foreign = read_sae(source, fmt)
    model_name = overrides.get("model") or foreign.model
    if not model_name:
        raise PatchSAEError(f"{source} does not name the model it was trained on; pass --model")
    cfg = _config(foreign, model_name, overrides)
    model = model_for(cfg)
    layer = check_fits(foreign, model.d_model, model.n_layers, overrides.get("layer"))
    cfg = replace(cfg, layer=overrides.get("layer", foreign.layer if foreign.layer is not None else layer))
    run_.init(cfg, {})
    sae = foreign.sae
    save_sae(run_.sae_dir, sae, {"model": cfg.model, "layer": layer, "tokens": cfg.tokens, "tokens_trained": None,
                                 "imported": {"format": foreign.format, "source": foreign.source,
                                              "model": foreign.model, "layer": foreign.layer,
                                              "dataset": foreign.dataset,
                                              **{k: v for k, v in foreign.info.items() if k != "run_config"}}})
    c = sae.cfg
    return ImportReport(run_.path, foreign.format, foreign.source, cfg.model, layer, cfg.tokens, c.arch, c.d_model,
                        c.d_sae)


def _config(foreign, model_name: str, overrides: dict) -> RunConfig:
    """The run's config: the model's defaults, the SAE's settings, what the SAE's files say, then the options."""
    c = foreign.sae.cfg
    base = start_config(model_name)
    recorded = foreign.info.get("run_config") if foreign.ours else None
    if isinstance(recorded, dict):  # our own export: the run it came from, evaluation settings and all
        names = {f.name for f in fields(RunConfig)}
        base = replace(base, **{k: v for k, v in recorded.items() if k in names})
    base = replace(base, model=model_name, arch=c.arch, k=c.k, l1_coeff=c.l1_coeff, l0_coeff=c.l0_coeff,
                   expansion=max(1, round(c.d_sae / c.d_model)))
    known = {"tokens": foreign.tokens, "dataset": foreign.dataset if foreign.ours else None}
    base = replace(base, **{k: v for k, v in known.items() if v is not None})
    if base.tokens not in ("all", "patch", "cls"):
        raise PatchSAEError(f"{foreign.source}: unknown token set {base.tokens!r} (all, patch, cls)")
    return replace(base, **{k: v for k, v in overrides.items() if k != "layer"})


def format_report(r: ImportReport) -> str:
    return (f"imported a {r.format} SAE ({r.arch}, {r.d_model} -> {r.d_sae}) from {r.source} into {r.run}: "
            f"{r.model}, block {r.layer}, tokens {r.tokens}; next: patchsae evaluate --run {r.run}")


def cli(args) -> None:
    from patchsae.cli import given

    report = run(Run(args.run), args.sae, getattr(args, "format", None), given(args, RunConfig, RUN_FIELDS))
    print(format_report(report))
