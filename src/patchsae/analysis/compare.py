"""The `compare` stage: what MaPLe adaptation does to CLIP's concepts, read through one SAE trained on the frozen
CLIP (the paper's section on adaptation, Table 1).

Both models run on the same images; the SAE encodes the hooked block's image tokens (CLS + patches; MaPLe's
visual prompt tokens are left out, as the SAE never saw such tokens, and their counts are reported apart).
  class-level counts   tokens with activation > tau, summed over the images of each class (as `analyze`)
  groups, per (class, latent), with ranks by count within the class (0 = most counted):
      high   rank < top_n and count > 0            (default top_n = 50)
      low    rank >= low_rank or count == 0        (default low_rank = 2 x top_n)
    re-used      high in CLIP and high in MaPLe
    high->low    high in CLIP, low in MaPLe         (suppressed)
    low->high    low in CLIP, high in MaPLe         (introduced)
  A latent that only slips just past rank top_n is in neither of the last two (it is "shifted"): with
  low_rank = top_n, the pure top-N rule, high->low and low->high would always be equal in number.
  The table reports, per group, the average number of latents per class over the base and the novel classes.
  correlation          Pearson correlation of the dataset-level count vectors (sum over classes), CLIP vs MaPLe
  masking              top-k masking accuracy (analysis/masking.py) for every pairing of the latent ranking
                       (class-level counts of CLIP or of MaPLe, on the rank split) and the classifier (CLIP or
                       MaPLe, spliced at its own hooked block), evaluated on the count split

Written to DIR/compare/<name>/: counts.safetensors, groups.csv, masking.csv, scatter_<class>.png, masking.png and
summary.json (last).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.analysis.masking import (BASELINES, ClassifyOptions, GridRow, check_counts, k_values, rank_positions,
                                       run_grid)
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE
from patchsae.utils import atomic_path, write_json

GROUPS = ("high", "high_to_low", "low_to_high")
COMPARE_KS = (1, 2, 5, 10, 50, 100, 500, None)


@dataclass(frozen=True)
class CompareOptions:
    dataset: str | None = None  # default: the dataset the prompts were trained on, else the run's
    dataset_path: str | None = None
    split: str | None = None  # counts, groups, correlation and masking accuracy; default: the run's eval split
    rank_split: str | None = None  # the latent rankings of the masking study; default: the run's train split
    max_images: int | None = None  # first N images of `split`
    max_rank_images: int | None = 5000
    max_eval_images: int | None = 2000  # masking evaluation (first N images of `split`)
    tau: float = 0.2
    top_n: int = 50
    low_rank: int | None = None  # default: 2 x top_n
    ks: tuple[int | None, ...] = COMPARE_KS
    examples: tuple[str, ...] = ()  # classes with a scatter figure; default: the first base and first novel
    masking: bool = True
    batch_size: int = 256
    name: str | None = None  # output folder under DIR/compare; default: the prompts folder's name


# ---- counts and groups --------------------------------------------------------------------------------------

@torch.no_grad()
def paired_counts(models: dict[str, ClipModel], sae: SAE, ds: LabelledImages, layer: int, tau: float,
                  max_images: int | None, batch_size: int, progress: str | None = None
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """Class-level counts (classes x d_sae) of every model on the same images, one pass (images preprocessed
    once), and the number of images. Keys: the model names for image tokens, and '<name>/prompt' for models
    with visual prompt tokens."""
    C, S = len(ds.class_names), sae.cfg.d_sae
    out: dict[str, torch.Tensor] = {}
    image_rows = {k: m.layout().image_token_mask() for k, m in models.items()}
    for k, rows in image_rows.items():
        out[k] = torch.zeros(C, S, dtype=torch.long)
        if not rows.all():
            out[f"{k}/prompt"] = torch.zeros(C, S, dtype=torch.long)
    pre = next(iter(models.values())).preprocess
    order = range(min(len(ds), max_images)) if max_images else None
    n = 0
    for pixels, labels, _ in iter_batches(ds, pre, batch_size, order, SkipLog(), progress):
        n += len(labels)
        for k, m in models.items():
            f_BTS = sae.encode(m.block_output(pixels, layer).float())
            rows = image_rows[k]
            out[k].index_add_(0, labels, (f_BTS[:, rows] > tau).sum(1).cpu())
            if f"{k}/prompt" in out:
                out[f"{k}/prompt"].index_add_(0, labels, (f_BTS[:, ~rows] > tau).sum(1).cpu())
    return out, n


def high_low(counts_CS: torch.Tensor, top_n: int, low_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) boolean masks (classes x d_sae): high = in the class's top_n by count and counted at all;
    low = at rank low_rank or beyond, or never counted."""
    pos_CS = rank_positions(counts_CS)
    return (pos_CS < top_n) & (counts_CS > 0), (pos_CS >= low_rank) | (counts_CS == 0)


def latent_groups(clip_CS: torch.Tensor, adapted_CS: torch.Tensor, top_n: int = 50,
                  low_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Per (class, latent) membership in the paper's groups, as boolean (classes x d_sae) masks."""
    low_rank = 2 * top_n if low_rank is None else low_rank
    if top_n < 1 or low_rank < top_n:
        raise PatchSAEError(f"need top_n >= 1 and low_rank >= top_n (got {top_n}, {low_rank})")
    if clip_CS.shape != adapted_CS.shape:
        raise PatchSAEError(f"count matrices differ in shape: {tuple(clip_CS.shape)} vs {tuple(adapted_CS.shape)}")
    hi_a, lo_a = high_low(clip_CS, top_n, low_rank)
    hi_b, lo_b = high_low(adapted_CS, top_n, low_rank)
    return {"high": hi_a & hi_b, "high_to_low": hi_a & lo_b, "low_to_high": lo_a & hi_b,
            "shifted": (hi_a & ~hi_b & ~lo_b) | (hi_b & ~hi_a & ~lo_a)}


def group_table(groups: dict[str, torch.Tensor], base: Sequence[int], novel: Sequence[int]) -> dict:
    """Average number of latents per class in each group, over the base and over the novel classes."""
    out = {}
    for g, mask_CS in groups.items():
        per_class = mask_CS.sum(1).double()
        out[g] = {part: (float(per_class[list(cls)].mean()) if len(cls) else None)
                  for part, cls in (("base", base), ("novel", novel))}
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


# ---- masking pairs ------------------------------------------------------------------------------------------

def masking_pairs(models: dict[str, ClipModel], sae: SAE, ds: LabelledImages, layer: int,
                  rank_counts: dict[str, torch.Tensor], opts: CompareOptions, progress: bool) -> list[dict]:
    """Accuracy of class-level top-k masking for each (ranking, classifier) pair: one row per pair, selection
    (class on / class off), k, with overall and per-class accuracy; plus each classifier's baselines."""
    copts = ClassifyOptions(tau=opts.tau, seeds=(), ks=opts.ks, batch_size=opts.batch_size,
                            max_eval_images=opts.max_eval_images)
    ks = k_values(sae.cfg.d_sae, opts.ks)
    for counts_CS in rank_counts.values():
        check_counts(counts_CS, len(ds.class_names), sae.cfg.d_sae)
    rankings = {("class", name): rank_positions(counts_CS) for name, counts_CS in rank_counts.items()}
    grid = [GridRow("none", m, None) for m in BASELINES]
    grid += [GridRow("class", mode, k, name) for name in rank_counts for mode in ("on", "off") for k in ks]
    rows = []
    for clf, model in models.items():  # one pass over the images per classifier serves every ranking
        tally, info = run_grid(model, sae, ds, layer, model.text_head(ds.class_names), rankings, grid, copts,
                               progress)
        for mode in ("original", "reconstruction"):
            acc, per = tally.accuracy(GridRow("none", mode, None))
            rows.append({"ranking": "", "classifier": clf, "mode": mode, "k": None, "accuracy": acc,
                         "per_class": per})
        for row in grid[len(BASELINES):]:
            acc, per = tally.accuracy(row)
            rows.append({"ranking": row.variant, "classifier": clf, "mode": row.mode, "k": row.k, "accuracy": acc,
                         "per_class": per})
        if progress:
            print(f"masking: classifier {clf}, rankings {', '.join(rank_counts)}: {info['images']} images, "
                  f"{info['seconds']} s (fast last block: {info['fast_last_block']})", file=sys.stderr)
    return rows


def _mean(xs: Sequence[float], idx: Sequence[int]) -> float | None:
    return sum(xs[i] for i in idx) / len(idx) if idx else None


# ---- figures ------------------------------------------------------------------------------------------------

def scatter_figure(path: Path, clip_S: torch.Tensor, adapted_S: torch.Tensor, groups: dict[str, torch.Tensor],
                   title: str) -> None:
    """Per latent: class-level count under CLIP (x) vs under MaPLe (y), coloured by group (symlog axes)."""
    from patchsae.analysis.figures import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    colours = {"other": "#c8c8c8", "shifted": "#8e8e8e", "high": "#2e86c1", "high_to_low": "#c0392b",
               "low_to_high": "#27ae60"}
    other = ~(groups["high"] | groups["high_to_low"] | groups["low_to_high"] | groups["shifted"])
    for g, mask in (("other", other), *((g, groups[g]) for g in ("shifted", "high", "high_to_low",
                                                                  "low_to_high"))):
        ax.scatter(clip_S[mask].numpy(), adapted_S[mask].numpy(), s=9 if g != "other" else 4, c=colours[g],
                   label=f"{g.replace('_to_', ' -> ')} ({int(mask.sum())})", alpha=0.85, linewidths=0)
    top = float(max(clip_S.max(), adapted_S.max(), 1))
    ax.plot([0, top], [0, top], color="black", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("class-level count, CLIP")
    ax.set_ylabel("class-level count, MaPLe")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def masking_figure(path: Path, rows: list[dict], title: str) -> None:
    """Accuracy vs k for every pairing of ranking and classifier, 'on' solid and 'off' dashed."""
    from patchsae.analysis.figures import _plt, finish_k_axes

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {("clip", "clip"): "#2e86c1", ("clip", "maple"): "#85c1e9", ("maple", "maple"): "#c0392b",
              ("maple", "clip"): "#f1948a"}
    for (ranking, clf), colour in styles.items():
        for mode, ls in (("on", "-o"), ("off", "--s")):
            pts = [(r["k"], 100 * r["accuracy"]) for r in rows
                   if r["ranking"] == ranking and r["classifier"] == clf and r["mode"] == mode]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=colour, ms=3,
                        label=f"ranking {ranking}, classifier {clf}, {mode}")
    finish_k_axes(fig, ax, path, title, "k (class-level top-k latents kept for 'on', removed for 'off')", 6)


# ---- the stage ----------------------------------------------------------------------------------------------

def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def stage_compare(run, adapted: str | Path, opts: CompareOptions = CompareOptions(), progress: bool = True) -> dict:
    """Compare the run's CLIP with its MaPLe-adapted version through the run's SAE; write DIR/compare/<name>."""
    from patchsae.analysis.analyze import open_run

    t0 = time.time()
    cfg, clip, sae, _ = open_run(run)
    return compare_adapted(run, cfg, clip, sae, adapted, opts, progress, t0)


def compare_adapted(run, cfg, clip: ClipModel, sae: SAE, adapted: str | Path, opts: CompareOptions = CompareOptions(),
                    progress: bool = True, t0: float | None = None) -> dict:
    """`stage_compare` on the run's config, CLIP and SAE as `open_run` returned them (opened once by a caller that
    compares several prompt sets). CLIP is only read (MaPLe shares its frozen weights); `t0`: when the stage
    started (default: now)."""
    from safetensors.torch import save_file

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
    out = run.path / "compare" / (opts.name or Path(adapted).name)
    tensors = {f"{k.replace('/', '_')}_counts_CS": v.contiguous() for k, v in counts.items()}

    rows, n_rank = [], 0
    if opts.masking:
        ds_rank = open_dataset(dataset, rank_split, **kw)
        if list(ds_rank.class_names) != names:
            raise PatchSAEError(f"{dataset}: splits {rank_split!r} and {split!r} have different classes")
        rank, n_rank = paired_counts(models, sae, ds_rank, layer, opts.tau, opts.max_rank_images, opts.batch_size,
                             "rank counts" if progress else None)
        tensors.update({f"rank_{k.replace('/', '_')}_counts_CS": v.contiguous() for k, v in rank.items()})
        rows = masking_pairs(models, sae, ds, layer, {"clip": rank["clip"], "maple": rank["maple"]}, opts,
                             progress)
    with atomic_path(out / "counts.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"class_names": ",".join(names), "tau": str(opts.tau)})
    n_cls = groups["high"].sum(1)
    with atomic_path(out / "groups.csv") as tmp:
        tmp.write_text(_csv(["class", "name", "part", *groups], [
            [c, names[c], "base" if c in base else "novel" if c in novel else "", *(int(groups[g][c].sum())
                                                                                    for g in groups)]
            for c in range(len(names))]))
    if rows:
        with atomic_path(out / "masking.csv") as tmp:
            tmp.write_text(_csv(["ranking", "classifier", "mode", "k", "accuracy", "base_accuracy",
                                 "novel_accuracy", *names], [
                [r["ranking"], r["classifier"], r["mode"], "" if r["k"] is None else r["k"], f"{r['accuracy']:.6f}",
                 f"{_mean(r['per_class'], base) or 0:.6f}", f"{_mean(r['per_class'], novel) or 0:.6f}",
                 *(f"{a:.6f}" for a in r["per_class"])] for r in rows]))
        masking_figure(out / "masking.png", rows, f"{dataset}/{split}: class-level top-k masking, "
                                                  f"ranking x classifier ({clip.name}, block {layer})")
    examples = (resolve_class_list(opts.examples, names, "--examples") if opts.examples
                else [c for c in (base[:1] + novel[:1])])
    figures = []
    for c in examples:
        fig = out / f"scatter_{c}_{names[c].replace(' ', '_').replace('/', '_')}.png"
        scatter_figure(fig, counts["clip"][c], counts["maple"][c], {g: m[c] for g, m in groups.items()},
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
                           | {"base": _mean(r["per_class"], base), "novel": _mean(r["per_class"], novel)}
                           for r in rows],
               "figures": figures, "options": asdict(opts), "seconds": round(time.time() - t0, 1)}
    write_json(out / "summary.json", summary)
    return {**summary, "out": str(out)}


def _fmt2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_compare(s: dict) -> str:
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
