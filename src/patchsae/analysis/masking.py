"""Top-k masking classification (the paper's section on what latents do to CLIP's predictions).

For an image, rank the SAE latents, keep only the top-k ("on") or remove them ("off"), decode the masked latents
and splice the decoding into the hooked block's residual stream at every image token (CLS + patches; visual
prompt tokens, if any, pass through), then finish the forward pass and classify zero-shot.

Rankings (`selection`):
  class    class-level counts (tokens with activation > tau, summed per class) of the image's TRUE class, so the
           mask differs per image; the paper's choice
  dataset  dataset-level counts (the sum over classes), one ranking for all images
  random   a seeded random permutation of the latents, one per seed; metrics.csv holds the mean over seeds
Counts come from a split other than the evaluated one (train -> test by default).

Rows of DIR/classify/metrics.csv (`selection,mode,k,accuracy,<one column per class>`, accuracies as fractions):
  none,original,,          the unspliced model
  none,reconstruction,,    the full SAE reconstruction spliced in (all latents kept)
  none,error_kept,,        reconstruction plus the SAE error term x_hat + (x - x_hat): must equal `original`
  <selection>,on|off,k     the masked grid; k is capped at d_sae (k = d_sae is "all": "on" then equals
                           `reconstruction` and "off" leaves only the decoder bias)

Speed: one forward to the hooked block per batch of images serves the whole grid; the SAE code of each token
is kept sparse (its nonzero values and their latent ids), so a mask costs one `embedding_bag` over the
decoder; and since only the CLS output of the last block feeds the image embedding, the last block is run for
the CLS query only (checked against the model's own `finish_from` on the first batch, else not used).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.analysis.latents import image_rows
from patchsae.data.base import LabelledImages, SkipLog, iter_batches
from patchsae.models.clip import ClipModel
from patchsae.models.text_head import cached_text_head
from patchsae.sae.model import SAE
from patchsae.utils import atomic_path, read_json, write_json

K_GRID = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, None)  # None = all latents
SELECTIONS = ("class", "dataset", "random")
BASELINES = ("original", "reconstruction", "error_kept")
ENCODE_ELEMENTS = 1 << 25  # (images x tokens x d_sae) elements encoded at once


@dataclass(frozen=True)
class ClassifyOptions:
    dataset: str | None = None  # default: the run's dataset (ranked and evaluated on it)
    rank_split: str | None = None  # default: the run's training split
    eval_split: str | None = None  # default: the run's eval split
    max_rank_images: int | None = None
    max_eval_images: int | None = None
    allow_same_split: bool = False
    tau: float = 0.2
    seeds: tuple[int, ...] = (0, 1, 2)
    ks: tuple[int | None, ...] = K_GRID
    batch_size: int = 256


def k_values(d_sae: int, ks: Sequence[int | None] = K_GRID) -> list[int]:
    """The k grid capped at d_sae (None = all), deduplicated and sorted."""
    return sorted({d_sae if k is None else min(int(k), d_sae) for k in ks})


# ---- rankings and masks ------------------------------------------------------------------------------------

def rank_positions(counts_XS: torch.Tensor) -> torch.Tensor:
    """Position of every latent in the descending ranking of each row (0 = most counted); ties keep latent order.

    With positions, "latent s is in the top-k of class c" is just pos[c, s] < k, for every k at once."""
    order_XS = torch.argsort(counts_XS, dim=-1, descending=True, stable=True)
    pos_XS = torch.empty_like(order_XS)
    pos_XS.scatter_(-1, order_XS, torch.arange(counts_XS.shape[-1]).expand_as(order_XS).contiguous())
    return pos_XS


def random_positions(d_sae: int, seed: int) -> torch.Tensor:
    """A seeded random ranking (positions of a random permutation)."""
    gen = torch.Generator().manual_seed(seed)
    return rank_positions(torch.rand(d_sae, generator=gen))


def keep_mask(pos: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """"on": keep the top-k ranked latents; "off": remove them."""
    if mode not in ("on", "off"):
        raise ValueError(f"mode must be on or off, not {mode!r}")
    return pos < k if mode == "on" else pos >= k


def image_positions(pos_XS: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Per-image ranking positions (B, d_sae): row `label` of a class ranking, or a shared ranking broadcast."""
    return pos_XS[labels_B] if pos_XS.dim() == 2 else pos_XS.expand(len(labels_B), -1)


def masked_latents(f_BTS: torch.Tensor, pos_BS: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """The dense definition of a mask: f with the latents outside the image's kept set zeroed (every token)."""
    return f_BTS * keep_mask(pos_BS, k, mode)[:, None, :]


# ---- sparse codes ----------------------------------------------------------------------------------------------

class SparseCodes:
    """The SAE code of a batch kept as its nonzero entries: value_BTK and latent id_BTK, K = the most latents
    active at any token (padding entries have value 0). Encoding runs in chunks of images, so no
    (images x tokens x d_sae) tensor larger than ENCODE_ELEMENTS exists.

    A masked decoding is an `embedding_bag` over the decoder rows, B*T*K*D work instead of B*T*d_sae*D, and
    the gathered rows are never materialised."""

    def __init__(self, sae: SAE, h_BTD: torch.Tensor):
        self.sae = sae
        B, T, _ = h_BTD.shape
        chunk = max(1, ENCODE_ELEMENTS // max(T * sae.cfg.d_sae, 1))
        values, ids = [], []
        for s in range(0, B, chunk):
            f_BTS = sae.encode(h_BTD[s: s + chunk])
            K = max(int((f_BTS > 0).sum(-1).max()), 1)
            v, i = f_BTS.topk(K, dim=-1, sorted=False)
            values.append(v)
            ids.append(i)
        K = max(v.shape[-1] for v in values)
        self.value_BTK = torch.cat([F.pad(v, (0, K - v.shape[-1])) for v in values])
        self.id_BTK = torch.cat([F.pad(i, (0, K - i.shape[-1])) for i in ids])

    def positions(self, pos_BS: torch.Tensor) -> torch.Tensor:
        """Ranking position of each stored entry (B, T, K), from per-image positions (B, d_sae)."""
        B, T, K = self.id_BTK.shape
        return pos_BS.gather(1, self.id_BTK.reshape(B, T * K)).view(B, T, K)

    def decode(self, keep_BTK: torch.Tensor | None = None) -> torch.Tensor:
        """SAE decoding of the kept entries in raw activation space (B, T, d_model); None keeps all."""
        v_BTK = self.value_BTK if keep_BTK is None else self.value_BTK * keep_BTK
        B, T, K = v_BTK.shape
        x_ND = F.embedding_bag(self.id_BTK.reshape(B * T, K), self.sae.W_dec, per_sample_weights=v_BTK.reshape(B * T, K),
                               mode="sum")
        return ((x_ND + self.sae.b_dec) / self.sae.input_scale).view(B, T, -1)


@contextmanager
def spliced(model: ClipModel, sae: SAE, layer: int, keep_S: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, every forward of `model` replaces the hooked block's output at the image tokens by the
    SAE decoding of the latents in `keep_S` (all if None), through the model's generic splice hook; for single
    forwards and checks (the grid itself computes the block output once and finishes it many times)."""
    rows_T, _ = image_rows(model)
    sae = sae.to(model.device)

    def fn(h_BTD: torch.Tensor) -> torch.Tensor:
        f_BTS = sae.encode(h_BTD[:, rows_T])
        out_BTD = h_BTD.clone()
        out_BTD[:, rows_T] = sae.decode(f_BTS if keep_S is None else f_BTS * keep_S.to(f_BTS.device))
        return out_BTD

    with model.replace_block_output(layer, fn):
        yield


# ---- class-level counts on the rank split -----------------------------------------------------------------

def _count(counts_CS: torch.Tensor, sae: SAE, h_BTD: torch.Tensor, labels_B: torch.Tensor, tau: float) -> None:
    f_BTS = sae.encode(h_BTD.float())
    counts_CS.index_add_(0, labels_B.long(), (f_BTS > tau).sum(1).cpu())


@torch.no_grad()
def counts_from_cache(cache, sae: SAE, n_classes: int, tau: float, max_images: int | None,
                      chunk: int = 64) -> tuple[torch.Tensor, int]:
    """Class-level counts from an activation cache of the rank split (no CLIP forward): images whose dataset
    index is below `max_images` (all if None). Returns (counts_CS, images)."""
    import numpy as np

    n = cache.n_images if max_images is None else int(np.searchsorted(cache.index[:, 0], max_images))
    rows_T = torch.tensor([k != "prompt" for k in cache.kinds])
    counts_CS = torch.zeros(n_classes, sae.cfg.d_sae, dtype=torch.long)
    for s in range(0, n, chunk):
        h_BTD = torch.from_numpy(cache.images(s, min(s + chunk, n)))[:, rows_T]
        labels_B = torch.from_numpy(cache.index[s: s + len(h_BTD), 1])
        _count(counts_CS, sae, h_BTD.to(sae.W_dec.device), labels_B, tau)
    return counts_CS, n


@torch.no_grad()
def counts_from_stream(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, tau: float,
                       max_images: int | None, batch_size: int, progress: bool) -> tuple[torch.Tensor, int]:
    """Class-level counts in one streaming pass over `ds` (the same definition as `analyze`)."""
    rows_T, _ = image_rows(model)
    counts_CS = torch.zeros(len(ds.class_names), sae.cfg.d_sae, dtype=torch.long)
    order = range(min(len(ds), max_images)) if max_images else None
    n = 0
    for pixels, labels, _ in iter_batches(ds, model.preprocess, batch_size, order, SkipLog(),
                                          "rank counts" if progress else None):
        _count(counts_CS, sae, model.block_output(pixels, layer)[:, rows_T], labels, tau)
        n += len(labels)
    return counts_CS, n


def rank_counts(run, model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, opts: ClassifyOptions,
                progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(counts_CS, provenance) for the rank split, from the cheapest source that holds exactly them:
    `analyze`'s stats of this split, the run's activation cache of this split, or a streaming pass."""
    from safetensors.torch import load_file

    from patchsae.activations.cache import ActivationCache

    ident = {"dataset": ds.name, "split": ds.split, "model": model.name, "layer": layer}
    mf = run.path / "analysis" / "manifest.json"
    stats_file, sae_file = run.path / "analysis" / "stats.safetensors", run.sae_dir / "model.safetensors"
    # stats older than the SAE's weights belong to an earlier SAE of this run: recount instead
    fresh = stats_file.exists() and sae_file.exists() and stats_file.stat().st_mtime >= sae_file.stat().st_mtime
    if mf.exists() and fresh:
        m = read_json(mf)
        if ({k: m.get(k) for k in ident} == ident and m.get("d_sae") == sae.cfg.d_sae and m.get("tau") == opts.tau
                and m.get("max_images") == opts.max_rank_images):
            counts_CS = load_file(str(stats_file))["class_counts_CS"]
            return counts_CS, {"source": str(mf.parent), "images": m["n_images"]}
    cache_dir = run.cache_dir(ds.split)
    if (cache_dir / "manifest.json").exists():
        m = read_json(cache_dir / "manifest.json")
        covers = m.get("max_images") is None or (opts.max_rank_images is not None
                                                   and m["max_images"] >= opts.max_rank_images)
        if {k: m.get(k) for k in ident} == ident and covers and len(m.get("class_names", [])) == len(ds.class_names):
            if progress:
                print(f"class-level counts from the activation cache {cache_dir}", file=sys.stderr)
            counts_CS, n = counts_from_cache(ActivationCache(cache_dir), sae, len(ds.class_names), opts.tau,
                                             opts.max_rank_images)
            return counts_CS, {"source": str(cache_dir), "images": n}
    counts_CS, n = counts_from_stream(model, sae, ds, layer, opts.tau, opts.max_rank_images, opts.batch_size,
                                      progress)
    return counts_CS, {"source": f"stream {ds.name}/{ds.split}", "images": n}


# ---- the grid ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GridRow:
    selection: str  # none, class, dataset, random
    mode: str  # original, reconstruction, error_kept (selection none); on, off
    k: int | None
    variant: int | str | None = None  # a random ranking's seed, or the name of the counts a class ranking used


@dataclass
class Tally:
    """Correct predictions and images per class, per grid row."""

    n_classes: int
    correct: dict = field(default_factory=dict)
    total_C: torch.Tensor | None = None

    def add(self, row: GridRow, pred_B: torch.Tensor, labels_B: torch.Tensor) -> None:
        hit = labels_B[pred_B == labels_B]
        c = torch.bincount(hit.cpu(), minlength=self.n_classes)
        self.correct[row] = self.correct.get(row, 0) + c

    def accuracy(self, row: GridRow) -> tuple[float, list[float]]:
        correct_C = self.correct[row].double()
        per_class = (correct_C / self.total_C.clamp_min(1)).tolist()
        return float(correct_C.sum() / self.total_C.sum().clamp_min(1)), per_class


def grid_rows(ks: Sequence[int], seeds: Sequence[int]) -> list[GridRow]:
    rows = [GridRow("none", m, None) for m in BASELINES]
    for sel in SELECTIONS:
        for s in (seeds if sel == "random" else (None,)):
            rows += [GridRow(sel, mode, k, s) for mode in ("on", "off") for k in ks]
    return rows


def check_counts(counts_CS: torch.Tensor, n_classes: int, d_sae: int) -> None:
    if counts_CS.shape != (n_classes, d_sae):
        raise PatchSAEError(f"class-level counts have shape {tuple(counts_CS.shape)}, expected ({n_classes}, "
                            f"{d_sae}): the rank split's classes differ from the evaluated split's")


def classify_grid(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, head_CE: torch.Tensor,
                  counts_CS: torch.Tensor, opts: ClassifyOptions, progress: bool = True) -> tuple[Tally, dict]:
    """The masking grid of `classify`: class-level, dataset-level and random rankings x on/off x k, plus the
    baselines, evaluated on `ds` (see run_grid)."""
    d_sae = sae.cfg.d_sae
    check_counts(counts_CS, len(ds.class_names), d_sae)
    ks = k_values(d_sae, opts.ks)
    rankings = {("class", None): rank_positions(counts_CS), ("dataset", None): rank_positions(counts_CS.sum(0))}
    rankings.update({("random", s): random_positions(d_sae, s) for s in opts.seeds})
    tally, info = run_grid(model, sae, ds, layer, head_CE, rankings, grid_rows(ks, opts.seeds), opts, progress)
    return tally, {**info, "ks": ks}


@torch.no_grad()
def run_grid(model: ClipModel, sae: SAE, ds: LabelledImages, layer: int, head_CE: torch.Tensor,
             rankings: dict[tuple, torch.Tensor], rows: Sequence[GridRow], opts: ClassifyOptions,
             progress: bool = True) -> tuple[Tally, dict]:
    """Evaluate every grid row on `ds`; one block_output per batch, one cheap finish per row. A masked row
    (selection, mode, k, variant) keeps or removes the top k of rankings[(selection, variant)]."""
    sae = sae.to(model.device).eval()
    C = len(ds.class_names)
    rankings = {key: pos.to(model.device) for key, pos in rankings.items()}
    rows_T, _ = image_rows(model)
    all_rows = bool(rows_T.all())
    tally = Tally(C, total_C=torch.zeros(C, dtype=torch.long))
    order = range(min(len(ds), opts.max_eval_images)) if opts.max_eval_images else None
    skips, finish, fast = SkipLog(), None, False
    n_img, t0 = 0, time.time()
    for pixels, labels, _ in iter_batches(ds, model.preprocess, opts.batch_size, order, skips,
                                          "classify" if progress else None):
        h_BTD = model.block_output(pixels, layer)
        if finish is None:
            finish, fast = model.finisher(layer, h_BTD[:8])
        labels = labels.to(model.device)
        tally.total_C += torch.bincount(labels.cpu(), minlength=C)
        n_img += len(labels)
        _grid_batch(model, sae, h_BTD, labels, head_CE, rankings, rows, rows_T, all_rows, finish, tally)
    if n_img == 0:
        raise PatchSAEError(f"no readable images in {ds.name}/{ds.split} ({skips.count} skipped)")
    return tally, {"images": n_img, "skipped": skips.count, "fast_last_block": fast,
                   "seconds": round(time.time() - t0, 1)}


def _grid_batch(model, sae, h_BTD, labels_B, head_CE, rankings, rows, rows_T, all_rows, finish, tally) -> None:
    """All grid rows for one batch of images."""
    codes = SparseCodes(sae, h_BTD[:, rows_T])

    def classify(row: GridRow, x_BID: torch.Tensor) -> None:
        if all_rows:
            resid_BTD = x_BID
        else:
            resid_BTD = h_BTD.clone()
            resid_BTD[:, rows_T] = x_BID
        tally.add(row, model.logits(finish(resid_BTD), head_CE).argmax(-1), labels_B)

    tally.add(GridRow("none", "original", None), model.logits(finish(h_BTD), head_CE).argmax(-1), labels_B)
    xhat_BID = codes.decode()
    classify(GridRow("none", "reconstruction", None), xhat_BID)
    classify(GridRow("none", "error_kept", None), xhat_BID + (h_BTD[:, rows_T] - xhat_BID))
    entry_pos = {key: codes.positions(image_positions(pos, labels_B)) for key, pos in rankings.items()}
    for row in rows:
        if row.selection != "none":
            pos_BTK = entry_pos[(row.selection, row.variant)]
            classify(row, codes.decode(keep_mask(pos_BTK, row.k, row.mode)))


def result_rows(tally: Tally, ks: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """metrics.csv rows: baselines, then class/dataset/random x on/off x k (random = mean over seeds)."""
    out = []
    for mode in BASELINES:
        acc, per = tally.accuracy(GridRow("none", mode, None))
        out.append({"selection": "none", "mode": mode, "k": None, "accuracy": acc, "per_class": per})
    for sel in SELECTIONS:
        for mode in ("on", "off"):
            for k in ks:
                accs = [tally.accuracy(GridRow(sel, mode, k, s)) for s in (seeds if sel == "random" else (None,))]
                per = torch.tensor([a[1] for a in accs]).mean(0).tolist()
                out.append({"selection": sel, "mode": mode, "k": k, "accuracy": sum(a[0] for a in accs) / len(accs),
                            "per_class": per, "seed_accuracies": [a[0] for a in accs] if sel == "random" else None})
    return out


def metrics_csv(rows: list[dict], class_names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["selection", "mode", "k", "accuracy", *class_names])
    for r in rows:
        w.writerow([r["selection"], r["mode"], "" if r["k"] is None else r["k"], f"{r['accuracy']:.6f}",
                    *(f"{a:.6f}" for a in r["per_class"])])
    return buf.getvalue()


def format_table(rows: list[dict], d_sae: int) -> str:
    """k down the side, selection x mode across, accuracies in %; baselines above."""
    base = {r["mode"]: r["accuracy"] for r in rows if r["selection"] == "none"}
    lines = [f"original {base['original']:.2%}   reconstruction {base['reconstruction']:.2%}   "
             f"error kept {base['error_kept']:.2%}"]
    cols = [(s, m) for s in SELECTIONS for m in ("on", "off")]
    lines.append(f"{'k':>11}" + "".join(f"{s + ' ' + m:>13}" for s, m in cols))
    grid = {(r["selection"], r["mode"], r["k"]): r["accuracy"] for r in rows if r["selection"] != "none"}
    for k in sorted({r["k"] for r in rows if r["k"] is not None}):
        label = f"{k} (all)" if k == d_sae else str(k)
        lines.append(f"{label:>11}" + "".join(f"{grid[(s, m, k)]:>13.2%}" for s, m in cols))
    return "\n".join(lines)


def masking_figure(path: str | Path, rows: list[dict], title: str) -> None:
    """Accuracy vs k (log axis), one line per selection and mode; dashed: original and full reconstruction."""
    from patchsae.analysis.figures import _plt, finish_k_axes

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"class": "#c0392b", "dataset": "#2e86c1", "random": "#7f8c8d"}
    for sel in SELECTIONS:
        for mode, style in (("on", "-o"), ("off", "--s")):
            pts = [(r["k"], r["accuracy"]) for r in rows if r["selection"] == sel and r["mode"] == mode]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=colours[sel], ms=3.5,
                    label=f"{sel} {mode}" + (" (mean of seeds)" if sel == "random" else ""))
    base = {r["mode"]: r["accuracy"] for r in rows if r["selection"] == "none"}
    ax.axhline(100 * base["original"], color="black", ls=":", lw=1.2, label="original (unspliced)")
    ax.axhline(100 * base["reconstruction"], color="#8e44ad", ls="--", lw=1.0, label="full reconstruction")
    finish_k_axes(fig, ax, path, title, "k (latents kept for 'on', removed for 'off')", 7)


# ---- the stage ---------------------------------------------------------------------------------------------

def stage_classify(run, opts: ClassifyOptions = ClassifyOptions(), progress: bool = True) -> dict:
    """Rank latents on one split, evaluate the masking grid on another; write DIR/classify and the figure."""
    from patchsae.analysis.analyze import open_run
    from patchsae.data import open_dataset

    t0 = time.time()
    cfg = run.load_config()
    dataset = opts.dataset or cfg.dataset
    rank_split, eval_split = opts.rank_split or cfg.train_split, opts.eval_split or cfg.eval_split
    if rank_split == eval_split and not opts.allow_same_split:
        raise PatchSAEError(f"latents would be ranked and evaluated on the same split {eval_split!r}; choose "
                            "different --rank-split/--eval-split or pass --allow-same-split")
    for name, n in (("--max-rank-images", opts.max_rank_images), ("--max-eval-images", opts.max_eval_images)):
        if n is not None and n < 1:
            raise PatchSAEError(f"{name} must be at least 1, not {n}")
    cfg, model, sae, layer = open_run(run)
    path = None if opts.dataset else getattr(cfg, "dataset_path", None)  # the run's local copy, if it has one
    ds_eval = open_dataset(dataset, eval_split, **({"path": path} if path else {}))
    ds_rank = open_dataset(dataset, rank_split, **({"path": path} if path else {}))
    if list(ds_rank.class_names) != list(ds_eval.class_names):
        raise PatchSAEError(f"{dataset}: splits {rank_split!r} and {eval_split!r} have different classes")
    out = run.path / "classify"
    head_CE = cached_text_head(model, ds_eval.class_names, out / "text_head.safetensors")
    counts_CS, rank_info = rank_counts(run, model, sae, ds_rank, layer, opts, progress)
    t_rank = time.time() - t0
    tally, info = classify_grid(model, sae, ds_eval, layer, head_CE, counts_CS, opts, progress)
    rows = result_rows(tally, info["ks"], opts.seeds)
    with atomic_path(out / "metrics.csv") as tmp:
        tmp.write_text(metrics_csv(rows, ds_eval.class_names))
    title = (f"{model.name} block {layer}, SAE {sae.cfg.d_sae} latents\nranked on {ds_rank.name}/{rank_split} "
             f"({rank_info['images']} images), evaluated on {eval_split} ({info['images']} images)")
    masking_figure(run.figures_dir / "masking_accuracy.png", rows, title)
    manifest = {"format": "patchsae-classify/1", "dataset": ds_eval.name, "rank_split": rank_split,
                "eval_split": eval_split, "rank_images": rank_info["images"], "rank_source": rank_info["source"],
                "eval_images": info["images"], "eval_skipped": info["skipped"], "model": model.name,
                "layer": layer, "d_sae": sae.cfg.d_sae, "ks": info["ks"], "class_names": list(ds_eval.class_names),
                "templates": len(model.templates), "fast_last_block": info["fast_last_block"],
                "random_seed_accuracies": {f"{r['mode']} {r['k']}": r["seed_accuracies"]
                                           for r in rows if r["selection"] == "random"},
                "options": {**asdict(opts), "ks": [k for k in opts.ks]},
                "seconds": {"rank": round(t_rank, 1), "grid": info["seconds"], "total": round(time.time() - t0, 1)}}
    write_json(out / "manifest.json", manifest)
    return {**manifest, "rows": rows}


def format_report(report: dict) -> str:
    return "\n".join([
        f"top-k masking on {report['dataset']}/{report['eval_split']} ({report['eval_images']} images), latents "
        f"ranked on {report['rank_split']} ({report['rank_images']} images, {report['rank_source']})",
        format_table(report["rows"], report["d_sae"]),
        f"seconds: {report['seconds']}",
    ])
