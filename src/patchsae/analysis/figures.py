"""Figures of the latent statistics (matplotlib Agg, PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from patchsae.utils import atomic_path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def listed_figures(folder: Path) -> list[Path]:
    """The figures a run shows (explorer endpoint, static report): regular files named *.png that start with
    PNG's signature, sorted. Links are left out, so a `figures/x.png` pointing at any other file (the run's
    config, a file outside the run) is never served or copied; so is anything else placed in the folder."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix == ".png" and not p.is_symlink() and p.is_file():
            with p.open("rb") as f:
                if f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
                    out.append(p)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _plt().close(fig)


def finish_k_axes(fig, ax, path: str | Path, title: str, xlabel: str, legend_size: float) -> None:
    """The masking figures' shared frame: log k on x, accuracy in % on y, legend, title; saved atomically."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size, loc="best")
    fig.tight_layout()
    _save(fig, path)


def scatter_figure(path: str | Path, frequency_S: torch.Tensor, mean_act_S: torch.Tensor, entropy_S: torch.Tensor,
                   title: str) -> None:
    """log10 frequency vs log10 mean activation of the latents that fired, coloured by label entropy: rare and
    weak latents sit bottom left, frequent strong ones top right."""
    plt = _plt()
    alive = frequency_S > 0
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if alive.any():
        sc = ax.scatter(torch.log10(frequency_S[alive]).numpy(), torch.log10(mean_act_S[alive]).numpy(),
                        c=entropy_S[alive].numpy(), cmap="viridis", s=6, alpha=0.7, linewidths=0)
        fig.colorbar(sc, ax=ax, label="label entropy of top images (nats)")
    ax.set_xlabel("log10 activated frequency (fraction of images)")
    ax.set_ylabel("log10 mean activation")
    ax.set_title(f"{title}\n{int(alive.sum())} of {len(frequency_S)} latents fired", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def reference_grid_figure(path: str | Path, rows: Sequence[dict]) -> None:
    """One row per latent: its reference images with the latent's patch map overlaid. Each row dict has
    `title` and `panels`, a list of (image_HW3 with overlay, caption)."""
    plt = _plt()
    n_cols = max((len(r["panels"]) for r in rows), default=1)
    fig, axes = plt.subplots(max(len(rows), 1), n_cols, figsize=(1.3 * n_cols, 1.55 * max(len(rows), 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, (img, caption) in enumerate(row["panels"]):
            axes[r, c].imshow(img)
            axes[r, c].set_title(caption, fontsize=5.5)
        axes[r, 0].text(-0.1, 0.5, row["title"], transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=6.5)
    fig.tight_layout()
    fig.subplots_adjust(left=0.22)
    _save(fig, path, dpi=100)


def class_bars_figure(path: str | Path, class_counts_CS: torch.Tensor, class_names: Sequence[str],
                      names: Sequence[str] | None = None, top: int = 5, max_classes: int = 30,
                      picks: Sequence[Sequence[int]] | None = None) -> None:
    """A small panel per class: its `top` latents by class-level count, or the latents `picks[c]` (e.g. by
    specificity), each with its class-level count (first `max_classes` classes)."""
    plt = _plt()
    C = min(len(class_names), max_classes)
    cols = min(5, C)
    n_rows = -(-C // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.6 * cols, 1.9 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c in range(C):
        ax = axes[c // cols, c % cols]
        ax.axis("on")
        if picks is None:
            vals, ids = class_counts_CS[c].float().topk(min(top, class_counts_CS.shape[1]))
        else:
            ids = torch.as_tensor(list(picks[c][:top]), dtype=torch.long)
            vals = class_counts_CS[c, ids].float()
        labels = [f"{i}" + (f" {names[i][:12]}" if names and names[i] else "") for i in ids.tolist()]
        ax.barh(np.arange(len(ids))[::-1], vals.numpy(), color="#3b6ea5")
        ax.set_yticks(np.arange(len(ids))[::-1], labels, fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(class_names[c], fontsize=8)
    how = "by class-level count" if picks is None else "most specific first"
    fig.suptitle(f"top latents per class, {how} (bars: tokens above tau, summed over the class's images)",
                 fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def masking_figure(path: str | Path, rows: list[dict], title: str) -> None:
    """Accuracy vs k (log axis), one line per selection and mode; dashed: original and full reconstruction."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"class": "#c0392b", "dataset": "#2e86c1", "random": "#7f8c8d"}
    for sel in ("class", "dataset", "random"):
        for mode, style in (("on", "-o"), ("off", "--s")):
            pts = [(r["k"], r["accuracy"]) for r in rows if r["selection"] == sel and r["mode"] == mode]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=colours[sel], ms=3.5,
                    label=f"{sel} {mode}" + (" (mean of seeds)" if sel == "random" else ""))
    base = {r["mode"]: r["accuracy"] for r in rows if r["selection"] == "none"}
    ax.axhline(100 * base["original"], color="black", ls=":", lw=1.2, label="original (unspliced)")
    ax.axhline(100 * base["reconstruction"], color="#8e44ad", ls="--", lw=1.0, label="full reconstruction")
    finish_k_axes(fig, ax, path, title, "k (latents kept for 'on', removed for 'off')", 7)


def groups_scatter_figure(path: Path, clip_S: torch.Tensor, adapted_S: torch.Tensor, groups: dict[str, torch.Tensor],
                   title: str) -> None:
    """Per latent: class-level count under CLIP (x) vs under MaPLe (y), coloured by group (symlog axes)."""
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


def pairs_masking_figure(path: Path, rows: list[dict], title: str) -> None:
    """Accuracy vs k for every pairing of ranking and classifier, 'on' solid and 'off' dashed."""
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


def kinds_figure(path: str | Path, counts: dict[str, int], top_position_S: torch.Tensor, positional_S: torch.Tensor,
                 grid: Sequence[int], title: str, n_cls: int = 1) -> None:
    """Left: latents per kind. Right: where the positional latents sit, as the number of positional latents
    whose strongest token is each patch of the grid (those at CLS are counted in the panel's title)."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    ax.barh(np.arange(len(counts))[::-1], list(counts.values()), color="#3b6ea5")
    ax.set_yticks(np.arange(len(counts))[::-1], list(counts))
    for y, v in zip(np.arange(len(counts))[::-1], counts.values()):
        ax.text(v, y, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("latents")
    ax.set_title(title, fontsize=9)
    pos_P = top_position_S[positional_S].long()
    hist = torch.bincount(pos_P[pos_P >= n_cls] - n_cls, minlength=grid[0] * grid[1]).reshape(*grid)
    im = ax2.imshow(hist.numpy(), cmap="magma")
    fig.colorbar(im, ax=ax2, label="positional latents")
    ax2.set_title(f"strongest token of positional latents\n({int((pos_P < n_cls).sum())} at CLS, "
                  f"{int((pos_P >= n_cls).sum())} on the {grid[0]}x{grid[1]} patches)", fontsize=9)
    ax2.set_xlabel("patch column")
    ax2.set_ylabel("patch row")
    fig.tight_layout()
    _save(fig, path)
