"""`patchsae analyze`: latent statistics, label entropy, class/dataset/group counts, concept names and figures for
a run's SAE, written to DIR/analysis/ and DIR/figures/; with --image, the patch maps of one image.

  DIR/analysis/stats.safetensors  every per-latent tensor (see `LatentStats` plus entropy_S, majority_S,
                                  dataset_counts_S, name_index_SN / name_score_SN, group_counts_S, and the
                                  `analysis.kinds.LatentKinds` tensors: kind_S, class_share_S, ...)
  DIR/analysis/latents.csv        one row per latent, with its kind
  DIR/analysis/manifest.json      written last: dataset, split, images, skipped, SAE (path and sha256 of its
                                  weights), model, layer, tau, k, class names, kinds (names, thresholds, counts),
                                  naming vocabulary and agreement
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path


from patchsae import PatchSAEError
from patchsae.analysis import concepts, figures, kinds, latents, patch_maps
from patchsae.analysis.latents import LOW_ENTROPY
from patchsae.data.base import SkipLog
from patchsae.options import opt
from patchsae.runs import Run
from patchsae.stages.setup import LayerChoice, layer_run
from patchsae.runs.artefacts import open_run, open_run_dataset, read_analysis, sae_identity
from patchsae.utils import atomic_path, csv_text, write_json, write_safetensors

NAME = "analyze"
HELP = ("per-latent statistics, reference images, class counts, concept names and figures (DIR/analysis, "
        "DIR/figures); with --image: patch maps of one image")
RUN_HELP = "run directory with a trained SAE"


@dataclass(frozen=True)
class AnalyzeOptions:
    dataset: str | None = opt(None, "dataset to analyse (default: the run's own); any --dataset spec")
    split: str | None = opt(None, "split to analyse (default: the run's eval split)")
    max_images: int | None = opt(None, "analyse only the first N images")
    k: int = opt(10, "reference images kept per latent", flag="--top-k", metavar="TOP_K")
    tau: float = opt(0.2, "token activation threshold for class counts")
    groups: tuple[str, ...] = opt((), "classes whose counts are summed (group level)", flag="--group",
                                  metavar="CLASS")
    phrases: str | None = opt(None, "text file of extra candidate concept names, one per line")
    n_grid: int = opt(12, "latents in the reference-image figure", cli=False)
    batch_size: int = opt(64, "images per forward pass")
    steer: bool = opt(False, "also name latents by steering at the hooked block and report that method's "
                      "agreement (k extra forward passes per latent)")
    dense_frequency: float = opt(kinds.KindThresholds.dense_frequency,
                                 "a latent firing on more than this fraction of images is dense")
    positional_share: float = opt(kinds.KindThresholds.positional_share, "a latent with more than this share of "
                                  "its activation mass at one token position is positional")
    selective_share: float = opt(kinds.KindThresholds.selective_share, "a latent with at least this share of its "
                                 "class-level count in one class is class-selective")
    min_count: int = opt(kinds.KindThresholds.min_count, "class-selective also needs this many tokens above tau")

    def thresholds(self) -> kinds.KindThresholds:
        return kinds.KindThresholds(self.dense_frequency, self.positional_share, self.selective_share,
                                    self.min_count)


@dataclass(frozen=True)
class PatchMapOptions:
    image: str | None = opt(None, "patch-map mode: a dataset index or an image file")
    latent: int | None = opt(None, "latent whose patch map is drawn (default: the top one)")
    patch: tuple[int, int] | None = opt(None, "also rank latents of this patch", metavar=("ROW", "COL"))


OPTIONS = (AnalyzeOptions, PatchMapOptions, LayerChoice)


@dataclass(frozen=True)
class AnalyzeReport:
    manifest: dict  # DIR/analysis/manifest.json as written
    table: list[dict]  # the most interpretable latents (the printout)


def _csv_text(stats, entropy_S, majority_S, names, name_index_SN, name_score_SN, class_names, lk) -> str:
    top = name_index_SN.shape[1]
    header = ["latent", "kind", "frequency", "mean_activation", "fired_images", "label_entropy", "majority_label",
              "dataset_count", "class_share", "top_class", "position_share", "top_position", "token_frequency",
              "top_images", "top_values", *[c for n in range(1, top + 1) for c in (f"name{n}", f"score{n}")]]
    rows = []
    columns = zip(stats.frequency_S.tolist(), stats.mean_act_S.tolist(), stats.fired_S.tolist(), entropy_S.tolist(),
                  majority_S.tolist(), latents.dataset_counts(stats.class_counts_CS).tolist(),
                  stats.top_index_SK.tolist(), stats.top_value_SK.tolist(), name_index_SN.tolist(),
                  name_score_SN.tolist())
    for l, (freq, mean, fired, ent, maj, count, refs, values, name_ids, scores) in enumerate(columns):
        keep = [n for n, i in enumerate(refs) if i >= 0]
        top_c, top_p = int(lk.top_class_S[l]), int(lk.top_position_S[l])
        rows.append([l, kinds.KINDS[int(lk.kind_S[l])], f"{freq:.6g}", f"{mean:.6g}", int(fired), f"{ent:.4f}",
                     class_names[maj] if maj >= 0 else "", int(count), f"{float(lk.class_share_S[l]):.4f}",
                     class_names[top_c] if top_c >= 0 else "", f"{float(lk.position_share_S[l]):.4f}",
                     top_p if top_p >= 0 else "", f"{float(stats.token_frequency_S[l]):.6g}",
                     " ".join(str(refs[n]) for n in keep), " ".join(f"{values[n]:.4g}" for n in keep),
                     *[c for i, sc in zip(name_ids, scores) for c in ((names[i], f"{sc:.4f}") if i >= 0 else ("", ""))]])
    return csv_text(header, rows)


def _reference_rows(model, sae, ds, layer, stats, entropy_S, ids, names_S, lk) -> list[dict]:
    """Rows for the reference-image figure: each reference with the latent's patch map overlaid."""
    layout = model.layout()
    wanted = sorted({int(i) for l in ids for i in stats.top_index_SK[l] if i >= 0})
    pixels = patch_maps.load_pixels(model, ds, wanted)
    f_by_image = {i: patch_maps.image_activations(model, sae, p, layer) for i, p in pixels.items()}
    rows = []
    for l in ids:
        panels = []
        for i, v, y in zip(*(t[l].tolist() for t in (stats.top_index_SK, stats.top_value_SK, stats.top_label_SK))):
            if i < 0 or i not in pixels:
                continue
            img = patch_maps.display_image(pixels[i], model)
            heat = patch_maps.upsample(patch_maps.patch_grid(f_by_image[i], layout, l), img.shape[:2])
            panels.append((patch_maps.heatmap_overlay(img, heat), f"{ds.class_names[y]} {v:.2f}"))
        title = (f"#{l} {names_S[l]}\n{kinds.KINDS[int(lk.kind_S[l])]}, {float(lk.class_share_S[l]):.0%} in one "
                 f"class\nH={float(entropy_S[l]):.2f} f={float(stats.frequency_S[l]):.3f}")
        rows.append({"title": title, "panels": panels})
    return rows


def run(run: Run, opts: AnalyzeOptions = AnalyzeOptions(), progress: bool = True) -> AnalyzeReport:
    t0 = time.time()
    cfg, model, sae, layer = open_run(run)
    ds = open_run_dataset(cfg, opts.dataset, opts.split or cfg.eval_split)
    thresholds = opts.thresholds()  # bad thresholds fail before the pass, not after it
    group_ids = latents.resolve_classes(list(opts.groups), ds.class_names)
    phrases = concepts.read_phrases(opts.phrases) if opts.phrases else []
    if not model.has_text and (phrases or opts.steer):
        raise PatchSAEError(f"{model.name} has no text tower: its latents are named by the majority label of their "
                            "references, so --phrases and --steer do not apply")
    skips = SkipLog()
    stats = latents.collect_stats(model, sae, ds, layer, opts.batch_size, opts.max_images, opts.k, opts.tau,
                                  skips, progress)
    if stats.n_images == 0:
        raise PatchSAEError(f"no readable images in {ds.name}/{ds.split} ({skips.count} skipped)")
    t_stats = time.time() - t0
    entropy_S, majority_S = latents.label_entropy(stats.top_value_SK, stats.top_label_SK, len(ds.class_names))
    lk = kinds.classify(stats.fired_S, stats.frequency_S, stats.class_counts_CS, stats.position_mass_ST,
                        stats.class_images_C, thresholds)
    selective_S = lk.kind_S == kinds.KINDS.index("class-selective")

    if model.has_text:
        names, vocab_VE = concepts.vocabulary(model, ds.class_names, phrases)
        name_index_SN, name_score_SN = concepts.name_latents(concepts.mean_reference_embeddings(model, ds, stats),
                                                             vocab_VE)
        method = "mean normalised embedding of the top reference images, cosine to the vocabulary"
    else:
        names = list(ds.class_names)
        name_index_SN, name_score_SN = concepts.majority_names(stats.top_value_SK, stats.top_label_SK, majority_S)
        method = "majority label of the top reference images (no text tower); score = its activation share"
    if opts.steer:
        steer_SE, _ = concepts.concept_directions(model, sae, ds, layer, stats)
        steer_index_SN, _ = concepts.name_latents(steer_SE, vocab_VE, 1)
    low_S = (stats.fired_S > 0) & (entropy_S < LOW_ENTROPY)
    agreement, n_low = concepts.name_agreement(name_index_SN[:, 0], majority_S, low_S, names, ds.class_names)
    agreement = agreement if model.has_text else None  # the majority label agrees with itself by construction
    agreement_steer = (concepts.name_agreement(steer_index_SN[:, 0], majority_S, low_S, names, ds.class_names)[0]
                       if opts.steer else None)
    agreement_sel, n_sel = concepts.name_agreement(name_index_SN[:, 0], lk.top_class_S, selective_S, names,
                                                   ds.class_names)
    t_names = time.time() - t0 - t_stats

    out = run.analysis_dir
    tensors = {**stats.tensors(), "entropy_S": entropy_S, "majority_S": majority_S,
               "dataset_counts_S": latents.dataset_counts(stats.class_counts_CS),
               "name_index_SN": name_index_SN, "name_score_SN": name_score_SN, **lk.tensors()}
    if opts.steer:
        tensors["steer_name_index_S"] = steer_index_SN[:, 0]
    if group_ids:
        tensors["group_counts_S"] = latents.group_counts(stats.class_counts_CS, group_ids)
    write_safetensors(out / "stats.safetensors", tensors)
    with atomic_path(out / "latents.csv") as tmp:
        tmp.write_text(_csv_text(stats, entropy_S, majority_S, names, name_index_SN, name_score_SN,
                                 ds.class_names, lk))

    names_S = [names[i] if i >= 0 else "" for i in name_index_SN[:, 0].tolist()]
    order = kinds.interpretable_order(lk, entropy_S, stats.frequency_S)
    grid_ids = (order or kinds.interpretable_order(lk, entropy_S, stats.frequency_S, kinds.KINDS[:-1]))[: opts.n_grid]
    title = f"{model.name} block {layer}, {ds.name}/{ds.split}, {stats.n_images} images"
    fig_dir = run.figures_dir
    figures.scatter_figure(fig_dir / "latent_scatter.png", stats.frequency_S, stats.mean_act_S, entropy_S, title)
    figures.reference_grid_figure(fig_dir / "reference_images.png",
                                  _reference_rows(model, sae, ds, layer, stats, entropy_S, grid_ids, names_S, lk))
    p_CS = kinds.class_shares(stats.class_counts_CS, stats.class_images_C)
    picks = [kinds.class_specific_order(p_CS, stats.class_counts_CS, c, opts.min_count)[:5]
             for c in range(len(ds.class_names))]
    figures.class_bars_figure(fig_dir / "class_top_latents.png", stats.class_counts_CS, ds.class_names, names_S,
                              picks=picks)
    figures.kinds_figure(fig_dir / "latent_kinds.png", lk.counts(), lk.top_position_S,
                         lk.kind_S == kinds.KINDS.index("positional"), model.layout().grid, title,
                         model.layout().n_cls)

    groups = None
    if group_ids:
        vals, ids = tensors["group_counts_S"].topk(min(5, stats.d_sae))
        groups = {"classes": [ds.class_names[c] for c in group_ids],
                  "top_latents": [[int(i), int(v)] for i, v in zip(ids, vals)]}
    manifest = {
        "format": "patchsae-analysis/2", "dataset": ds.name, "split": ds.split, "n_images": stats.n_images,
        "max_images": opts.max_images, "n_skipped": skips.count, "skipped": [list(s) for s in skips.skipped[:20]],
        "sae": str(run.sae_dir.resolve()), "sae_sha256": sae_identity(run), "model": model.name, "layer": layer, "d_sae": stats.d_sae,
        "tau": opts.tau, "k": opts.k, "class_names": list(ds.class_names), "entropy_unit": "nats",
        "low_entropy_threshold": LOW_ENTROPY, "n_low_entropy": n_low,
        "kinds": {"names": list(kinds.KINDS), "thresholds": asdict(thresholds), "counts": lk.counts(),
                  "shown_by_default": list(kinds.SHOWN_BY_DEFAULT)},
        "naming": {"method": method,
                   "vocabulary": names, "phrases_file": opts.phrases, "agreement": agreement,
                   "agreement_steer": agreement_steer, "agreement_selective": agreement_sel,
                   "n_selective": n_sel},
        "groups": groups, "options": asdict(opts),
        "seconds": {"stats": round(t_stats, 1), "names": round(t_names, 1), "total": round(time.time() - t0, 1)},
    }
    write_json(out / "manifest.json", manifest)
    table = [{"latent": l, "name": names_S[l], "kind": kinds.KINDS[int(lk.kind_S[l])],
              "class_share": float(lk.class_share_S[l]), "frequency": float(stats.frequency_S[l]),
              "mean_activation": float(stats.mean_act_S[l]), "entropy": float(entropy_S[l]),
              "majority": ds.class_names[int(majority_S[l])] if int(majority_S[l]) >= 0 else ""}
             for l in order[:20]]
    return AnalyzeReport(manifest, table)


def format_report(r: AnalyzeReport) -> str:
    report = {**r.manifest, "table": r.table}
    lines = ["most interpretable latents (class-selective first, by their largest class share; dense and "
             "positional left out):",
             f"{'latent':>6}  {'name':<14} {'kind':<15} {'share':>6} {'freq':>7} {'mean act':>9} {'entropy':>7}  "
             f"majority label"]
    for r in report["table"]:
        lines.append(f"{r['latent']:>6}  {r['name'][:14]:<14} {r['kind']:<15} {r['class_share']:>6.1%} "
                     f"{r['frequency']:>7.4f} {r['mean_activation']:>9.4f} {r['entropy']:>7.3f}  {r['majority']}")
    agree = report["naming"]["agreement"]
    agree_steer = report["naming"]["agreement_steer"]
    fmt = lambda a: "n/a" if a is None else f"{a:.1%}"  # noqa: E731
    steer_note = f" (steering at the hooked block instead: {fmt(agree_steer)})" if agree_steer is not None else ""
    lines += [
        f"{report['n_images']} images of {report['dataset']}/{report['split']} ({report['n_skipped']} skipped), "
        f"{report['d_sae']} latents, block {report['layer']}",
        f"latents with label entropy < {report['low_entropy_threshold']} nats: {report['n_low_entropy']}",
        "latents per kind: " + ", ".join(f"{k} {n}" for k, n in report["kinds"]["counts"].items())
        + f" (thresholds: {report['kinds']['thresholds']})",
        f"name agreement (top name = majority label of the references): {fmt(agree)}{steer_note} over the "
        f"low-entropy latents; {fmt(report['naming']['agreement_selective'])} over the "
        f"{report['naming']['n_selective']} class-selective ones (top name = their top class)",
    ]
    if report["groups"]:
        g = report["groups"]
        lines.append(f"group {'+'.join(g['classes'])}: top latents "
                     + ", ".join(f"{i} ({v})" for i, v in g["top_latents"]))
    lines.append(f"seconds: {report['seconds']}")
    return "\n".join(lines)


def patch_map_report(run: Run, image: str, latent: int | None = None, patch: tuple[int, int] | None = None,
                     dataset: str | None = None, split: str | None = None, n: int = 5) -> list[str]:
    """Top latents of one image (and of one patch); writes the patch map of `latent` (default: the top one)
    as DIR/figures/patch_map_<image>_<latent>.png. Returns the lines to print."""
    cfg, model, sae, layer = open_run(run)
    ds = open_run_dataset(cfg, dataset, split or cfg.eval_split) if image.isdigit() else None
    pixels, label, desc = patch_maps.load_image(image, ds, model)
    f_TS = patch_maps.image_activations(model, sae, pixels, layer)
    analysis = read_analysis(run, sae.cfg.d_sae)
    names = analysis.names() if analysis is not None else [""] * sae.cfg.d_sae
    layout = model.layout()
    shown = f"{desc}" + (f" (label {ds.class_names[label]})" if ds is not None and label is not None else "")
    ids, vals = patch_maps.top_latents_of_image(f_TS, n)
    lines = [f"top latents of {shown} (image-level activation):"]
    lines += [f"  {i:>6}  {v:8.4f}  {names[i]}" for i, v in zip(ids, vals)]
    if patch is not None:
        p_ids, p_vals = patch_maps.top_latents_of_patch(f_TS, layout, *patch, n)
        lines.append(f"top latents of patch {tuple(patch)}:")
        lines += [f"  {i:>6}  {v:8.4f}  {names[i]}" for i, v in zip(p_ids, p_vals)]
        ids = p_ids
    latent = ids[0] if latent is None else latent
    grid = patch_maps.patch_grid(f_TS, layout, latent)
    stem = Path(image).stem if not image.isdigit() else image
    path = run.figures_dir / f"patch_map_{stem}_{latent}.png"
    patch_maps.write_patch_map_figure(path, patch_maps.display_image(pixels, model), grid,
                                      f"latent {latent} {names[latent]} on {shown}")
    lines.append(f"wrote {path}")
    return lines


def cli(args) -> None:
    from patchsae.cli import given

    run_ = layer_run(args)
    pm = PatchMapOptions(**given(args, PatchMapOptions))
    opts = AnalyzeOptions(**given(args, AnalyzeOptions))
    if pm.image is not None:
        for line in patch_map_report(run_, pm.image, pm.latent, pm.patch, opts.dataset, opts.split):
            print(line)
        return
    if pm.latent is not None or pm.patch is not None:
        raise PatchSAEError("--latent and --patch need --image")
    print(format_report(run(run_, opts)))
    print(f"wrote {run_.analysis_dir} and {run_.figures_dir}")
