"""`patchsae compare`: what MaPLe adaptation does to CLIP's concepts, read through one SAE trained on the frozen
CLIP (the paper's section on adaptation, Table 1).

Both models run on the same images; the SAE encodes the hooked block's image tokens (CLS + patches; MaPLe's
visual prompt tokens are left out, as the SAE never saw such tokens, and their counts are reported apart).
  class-level counts   tokens with activation > tau, summed over the images of each class (as `analyze`)
  groups               analysis/groups.py: re-used, high->low (suppressed), low->high (introduced), shifted.
  The table reports, per group, the average number of latents per class over the base and the novel classes.
  correlation          Pearson correlation of the dataset-level count vectors (sum over classes), CLIP vs MaPLe
  masking              top-k masking accuracy (analysis/grid.py) for every pairing of the latent ranking
                       (class-level counts of CLIP or of MaPLe, on the rank split) and the classifier (CLIP or
                       MaPLe, spliced at its own hooked block), evaluated on the count split

Written to DIR/compare/<name>/: counts.safetensors, groups.csv, masking.csv, scatter_<class>.png, masking.png and
summary.json (last).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.runs import Run
from patchsae.stages.setup import LayerChoice, layer_run
from patchsae.runs.config import DATASET_PATH_HELP

NAME = "compare"
HELP = ("CLIP vs a MaPLe-adapted CLIP through the run's SAE: re-used / suppressed / introduced latents per class, "
        "count correlation, masking ranking x classifier")
RUN_HELP = "run directory with a trained SAE"
COMPARE_KS = (1, 2, 5, 10, 50, 100, 500, None)


@dataclass(frozen=True)
class Adapted:
    adapted: str = opt(help="MaPLe prompts: a folder from `patchsae adapt`, or an official MaPLe checkpoint "
                       "(model.pth.tar-N)", required=True)


@dataclass(frozen=True)
class CompareOptions:
    dataset: str | None = opt(None, "dataset (default: the one the prompts were trained on)")
    dataset_path: str | None = opt(None, DATASET_PATH_HELP)
    split: str | None = opt(None, "split for counts, groups and masking accuracy (default: the run's eval split)")
    rank_split: str | None = opt(None, "split whose counts rank latents for masking (default: the run's train "
                                 "split)")
    max_images: int | None = opt(None, "count on the first N images of --split")
    max_rank_images: int | None = opt(5000, "rank-split images counted for the masking rankings")
    max_eval_images: int | None = opt(2000, "masking evaluation images")
    tau: float = opt(0.2, "token activation threshold")
    top_n: int = opt(50, "'high' = in the class's top-N latents by count")
    low_rank: int | None = opt(None, "'low' = ranked at or beyond this, or never counted (2 x top-n)")
    ks: tuple[int | None, ...] = opt(COMPARE_KS, "the masking k grid", cli=False)
    examples: tuple[str, ...] = opt((), "classes with a scatter figure (default: first base and first novel class)",
                                    metavar="CLASS")
    masking: bool = opt(True, "skip the masking study", flag="--no-masking")
    batch_size: int = opt(256, "images per forward pass")
    name: str | None = opt(None, "output folder under DIR/compare (default: the prompts folder's name)", cli=False)


OPTIONS = (Adapted, CompareOptions, LayerChoice)


@dataclass(frozen=True)
class CompareReport:
    summary: dict  # DIR/compare/<name>/summary.json as written
    out: Path


def run(run: Run, adapted: str | Path, opts: CompareOptions = CompareOptions(), progress: bool = True
        ) -> CompareReport:
    """Compare the run's CLIP with its MaPLe-adapted version through the run's SAE; write DIR/compare/<name>."""
    from patchsae.runs.artefacts import open_run

    t0 = time.time()
    cfg, clip, sae, _ = open_run(run)
    return compare_adapted(run, cfg, clip, sae, adapted, opts, progress, t0)


@torch.no_grad()
def compare_adapted(run: Run, cfg, clip, sae, adapted: str | Path, opts: CompareOptions, progress: bool = True,
                    t0: float | None = None) -> CompareReport:
    """`run` on the run's config, CLIP and SAE as `open_run` returned them (opened once by a caller that compares
    several prompt sets). CLIP is only read (MaPLe shares its frozen weights); `t0`: when the stage started
    (default: now)."""

    from patchsae.analysis.counts import paired_counts
    from patchsae.analysis.figures import groups_scatter_figure, pairs_masking_figure
    from patchsae.analysis.grid import masking_pairs
    from patchsae.analysis.groups import class_mean, group_table, latent_groups, pearson
    from patchsae.utils import atomic_path, csv_text, write_json, write_safetensors

    from patchsae.data import open_dataset
    from patchsae.data.registry import base_novel_split
    from patchsae.data.subsets import resolve_class_list
    from patchsae.models.maple import load_adapted, read_config

    t0 = time.time() if t0 is None else t0
    layer = clip.resolve_layer(cfg.layer)
    maple = load_adapted(clip, adapted)
    sae = sae.to(clip.device).eval()
    acfg = read_config(adapted)
    dataset = opts.dataset or acfg.get("dataset") or cfg.dataset
    path = opts.dataset_path or (acfg.get("dataset_path") if dataset == acfg.get("dataset") else None) or (
        getattr(cfg, "dataset_path", None) if dataset == cfg.dataset else None)
    kw = {"path": path} if path else {}
    split, rank_split = opts.split or cfg.eval_split, opts.rank_split or cfg.train_split
    if opts.masking and rank_split == split:
        raise PatchSAEError(f"the masking ranking and its evaluation would both use split {split!r}; choose "
                            "another --rank-split (or --no-masking)")
    ds = open_dataset(dataset, split, **kw)
    names = list(ds.class_names)
    if acfg.get("class_names") == names:
        base, novel = acfg["base_classes"], acfg["novel_classes"]
    else:
        base, novel = base_novel_split(len(names))
    models = {"clip": clip, "maple": maple}
    counts, n_images = paired_counts(models, sae, ds, layer, opts.tau, opts.max_images, opts.batch_size,
                           "counts" if progress else None)
    low_rank = 2 * opts.top_n if opts.low_rank is None else opts.low_rank
    groups = latent_groups(counts["clip"], counts["maple"], opts.top_n, low_rank)
    table = group_table(groups, base, novel)
    with_prompts = group_table(latent_groups(counts["clip"], counts["maple"] + counts["maple/prompt"], opts.top_n,
                                             low_rank), base, novel)
    corr = {"dataset_level": pearson(counts["clip"].sum(0), counts["maple"].sum(0)),
            "class_level_mean": sum(pearson(counts["clip"][c], counts["maple"][c]) for c in range(len(names)))
            / len(names)}
    prompt_share = float(counts["maple/prompt"].sum() / max(int((counts["maple"] + counts["maple/prompt"]).sum()), 1))
    out = run.compare_dir(opts.name or Path(adapted).name)
    tensors = {f"{k.replace('/', '_')}_counts_CS": v.contiguous() for k, v in counts.items()}

    rows, n_rank = [], 0
    if opts.masking:
        ds_rank = open_dataset(dataset, rank_split, **kw)
        if list(ds_rank.class_names) != names:
            raise PatchSAEError(f"{dataset}: splits {rank_split!r} and {split!r} have different classes")
        rank, n_rank = paired_counts(models, sae, ds_rank, layer, opts.tau, opts.max_rank_images, opts.batch_size,
                             "rank counts" if progress else None)
        tensors.update({f"rank_{k.replace('/', '_')}_counts_CS": v.contiguous() for k, v in rank.items()})
        rows = masking_pairs(models, sae, ds, layer, {"clip": rank["clip"], "maple": rank["maple"]}, opts.ks,
                             opts.max_eval_images, opts.batch_size, progress)
    write_safetensors(out / "counts.safetensors", tensors, {"class_names": ",".join(names), "tau": str(opts.tau)})
    n_cls = groups["high"].sum(1)
    with atomic_path(out / "groups.csv") as tmp:
        tmp.write_text(csv_text(["class", "name", "part", *groups], [
            [c, names[c], "base" if c in base else "novel" if c in novel else "", *(int(groups[g][c].sum())
                                                                                    for g in groups)]
            for c in range(len(names))]))
    if rows:
        with atomic_path(out / "masking.csv") as tmp:
            tmp.write_text(csv_text(["ranking", "classifier", "mode", "k", "accuracy", "base_accuracy",
                                 "novel_accuracy", *names], [
                [r["ranking"], r["classifier"], r["mode"], "" if r["k"] is None else r["k"], f"{r['accuracy']:.6f}",
                 f"{class_mean(r['per_class'], base) or 0:.6f}", f"{class_mean(r['per_class'], novel) or 0:.6f}",
                 *(f"{a:.6f}" for a in r["per_class"])] for r in rows]))
        pairs_masking_figure(out / "masking.png", rows, f"{dataset}/{split}: class-level top-k masking, "
                                                  f"ranking x classifier ({clip.name}, block {layer})")
    examples = (resolve_class_list(opts.examples, names, "--examples") if opts.examples
                else [c for c in (base[:1] + novel[:1])])
    figures = []
    for c in examples:
        fig = out / f"scatter_{c}_{names[c].replace(' ', '_').replace('/', '_')}.png"
        groups_scatter_figure(fig, counts["clip"][c], counts["maple"][c], {g: m[c] for g, m in groups.items()},
                       f"{dataset}/{split}, class {names[c]!r} ({'base' if c in base else 'novel'})\n"
                       f"high = top-{opts.top_n}, low = rank >= {low_rank} or 0")
        figures.append(str(fig))
    summary = {"format": "patchsae-compare/1", "dataset": dataset, "split": split, "images": n_images,
               "rank_split": rank_split if rows else None, "rank_images": n_rank if rows else None,
               "model": clip.name, "adapted": str(adapted), "layer": layer, "d_sae": sae.cfg.d_sae,
               "class_names": names, "base_classes": base, "novel_classes": novel,
               "rule": {"tau": opts.tau, "top_n": opts.top_n, "low_rank": low_rank},
               "groups": table, "groups_with_prompt_tokens": with_prompts, "correlation": corr,
               "prompt_token_share": prompt_share, "per_class": {g: groups[g].sum(1).tolist() for g in groups},
               "latents_high_per_class": n_cls.tolist(), "accuracy": acfg.get("accuracy"),
               "masking": [{k: v for k, v in r.items() if k != "per_class"}
                           | {"base": class_mean(r["per_class"], base), "novel": class_mean(r["per_class"], novel)}
                           for r in rows],
               "figures": figures, "options": asdict(opts), "seconds": round(time.time() - t0, 1)}
    write_json(out / "summary.json", summary)
    return CompareReport(summary, out)


def _fmt2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_report(r: CompareReport) -> str:
    s = r.summary
    g = s["groups"]
    lines = [f"CLIP vs MaPLe through one SAE ({s['model']}, block {s['layer']}, {s['d_sae']} latents) on "
             f"{s['dataset']}/{s['split']}; high = top-{s['rule']['top_n']} by class-level count (tau "
             f"{s['rule']['tau']}), low = rank >= {s['rule']['low_rank']} or never counted",
             "average latents per class      base    novel"]
    for k, label in (("high", "high in both (re-used)"), ("high_to_low", "high -> low"),
                     ("low_to_high", "low -> high"), ("shifted", "shifted (neither)")):
        b, n = g[k]["base"], g[k]["novel"]
        lines.append(f"  {label:<27}{b if b is not None else float('nan'):>7.2f}"
                     f"{n if n is not None else float('nan'):>9.2f}")
    w = s["groups_with_prompt_tokens"]
    lines.append("  with MaPLe's visual prompt tokens counted too: " + ", ".join(
        f"{k.replace('_to_', '->')} {_fmt2(w[k]['base'])} / {_fmt2(w[k]['novel'])}"
        for k in ("high", "high_to_low", "low_to_high")))
    lines.append(f"correlation of dataset-level counts: {s['correlation']['dataset_level']:.4f} (class-level mean "
                 f"{s['correlation']['class_level_mean']:.4f}); visual prompt tokens hold "
                 f"{s['prompt_token_share']:.1%} of MaPLe's counts when included")
    if s["masking"]:
        ks = sorted({r["k"] for r in s["masking"] if r["k"] is not None})
        lines.append("class-level top-k masking, accuracy % (ranking -> classifier, on | off):")
        lines.append(f"{'k':>18}" + "".join(f"{k:>7}" for k in ks))
        for rk in ("clip", "maple"):
            for clf in ("clip", "maple"):
                for mode in ("on", "off"):
                    acc = {r["k"]: r["accuracy"] for r in s["masking"]
                           if r["ranking"] == rk and r["classifier"] == clf and r["mode"] == mode}
                    lines.append(f"{rk + '->' + clf + ' ' + mode:>18}" + "".join(f"{100 * acc[k]:>7.1f}" for k in ks))
        base = {(r["classifier"], r["mode"]): r["accuracy"] for r in s["masking"] if r["ranking"] == ""}
        lines.append("unspliced: " + ", ".join(f"{c} {100 * base[(c, 'original')]:.2f}%" for c in ("clip", "maple"))
                     + "; SAE spliced: " + ", ".join(f"{c} {100 * base[(c, 'reconstruction')]:.2f}%"
                                                     for c in ("clip", "maple")))
    return "\n".join(lines)


def cli(args) -> None:
    from patchsae.cli import given

    report = run(layer_run(args), args.adapted, CompareOptions(**given(args, CompareOptions)))
    print(format_report(report))
    print(f"wrote {report.out}")
