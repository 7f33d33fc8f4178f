"""`patchsae report`: the explorer's content for the most interpretable latents and for every class, as a static
site (HTML + PNG + JSON, relative links only) that opens from disk or any static host.

  SITE/index.html            run summary, the run's figures, the latents (most interpretable first), the classes
  SITE/latents/<L>.html      statistics, names, class-level counts, reference images with the latent's heatmap
  SITE/classes/<C>.html      the class's top latents by class-level counts, with their top reference image
  SITE/img/, SITE/figures/   PNGs;  SITE/data/latents.json, SITE/data/classes.json  the same content as JSON
  SITE/style.css

The site is written into a temporary folder beside SITE and renamed onto it at the end, so an interrupted
report leaves the previous site (or none), never half of one.
"""

from __future__ import annotations

import glob
import json
import shutil
import tempfile
from html import escape
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.analysis.figures import listed_figures
from patchsae.explorer.session import STATIC_DIR, Explorer
from patchsae.utils import WRITE_ERRNOS, write_error

THUMB = 112  # pixels per side of the report's reference images
MAX_CLASS_BARS = 30  # a latent page shows the classes with the largest counts, at most this many


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="icon" href="data:,"><link rel="stylesheet" href="{up}style.css"></head>\n<body>'
            f'<header><h1><a href="{up}index.html" style="color:#fff">patchsae report</a></h1>'
            f'<span>{escape(title)}</span></header>\n<div class="page">{body}</div></body></html>\n')


def _bars(rows: list[tuple[str, float, str | None]]) -> str:
    """Horizontal bars: (label, value, link or None)."""
    top = max([v for _, v, _ in rows] + [1e-12])
    out = []
    for label, value, href in rows:
        name = f'<a href="{href}">{escape(label)}</a>' if href else escape(label)
        out.append(f'<div class="bar"><span>{name}</span><div class="fill" style="width:{100 * value / top:.1f}%">'
                   f'</div><span class="val">{value:g}</span></div>')
    return '<div class="bars counts">' + "".join(out) + "</div>"


def _badge(kind: str) -> str:
    return f'<span class="badge kind-{escape(kind)}">{escape(kind)}</span>'


def _latent_row(s: dict, href: str, extra: str = "") -> str:
    return (f'<tr><td><a href="{href}">#{s["latent"]}</a></td><td>{_badge(s["kind"])}</td><td>{escape(s["label"])}</td>'
            f'<td>{100 * s["class_share"]:.0f}%</td><td>{s["frequency"]:.4f}</td><td>{s["mean_activation"]:.4f}</td>'
            f'<td>{s["entropy"]:.3f}</td>{extra}</tr>')


LATENT_HEAD = ("<tr><th>latent</th><th>kind</th><th>name (score)</th><th>in one class</th><th>frequency</th>"
               "<th>mean act.</th><th>entropy (nats)</th>")


def write_report(ex: Explorer, out: str | Path, top: int = 50, class_top: int = 5) -> dict:
    """Write the site: pages for the `top` most interpretable latents and for each class's `class_top` latents
    (by class-level count); returns counts and the index path."""
    if ex.ds is None:
        raise PatchSAEError(f"the report needs the run's dataset for reference images: {ex.ds_error}")
    out = Path(out)
    if out.exists() and not (out / "index.html").exists() and any(out.iterdir()):
        raise PatchSAEError(f"{out} exists and is not a patchsae report; choose a new --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            info = _write(ex, tmp, top, class_top)
        except OSError as exc:  # a full disk or I/O error: the previous report stays as it was
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise write_error(out, exc) from None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        for stale in out.parent.glob(f".{glob.escape(out.name)}.*"):  # left by a killed earlier report
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "index": str(out / "index.html")}


def _write(ex: Explorer, site: Path, top: int, class_top: int) -> dict:
    for sub in ("latents", "classes", "img", "figures", "data"):
        (site / sub).mkdir()
    shutil.copy(STATIC_DIR / "style.css", site / "style.css")
    with open(site / "style.css", "a") as f:
        f.write("\n.page { padding: 1em; max-width: 1100px; }\n.page a { color: #1f5fa0; }\n"
                ".page table { width: auto; }\n.figs img { max-width: 48%; }\n")

    classes = [ex.class_latents(c, class_top) for c in range(len(ex.class_names))]
    chosen = list(dict.fromkeys([*ex.order[:top], *(r["latent"] for c in classes for r in c["latents"])]))
    n_img = 0
    details = {}
    for l in chosen:
        d = ex.latent(l)
        for n, ref in enumerate(d["references"]):
            ref["heatmap"] = f"img/latent_{l}_ref{n}.png"
            (site / ref["heatmap"]).write_bytes(ex.image_png(f"ds-{ref['index']}", l, "heatmap", size=THUMB))
            n_img += 1
        details[l] = d
        (site / "latents" / f"{l}.html").write_text(_latent_page(ex, d))
    for c in classes:
        (site / "classes" / f"{c['index']}.html").write_text(_class_page(c, details))

    figures = listed_figures(ex.run.figures_dir)
    for p in figures:
        shutil.copy(p, site / "figures" / p.name)
    (site / "data" / "latents.json").write_text(json.dumps({"info": ex.info(), "latents": list(details.values())}))
    (site / "data" / "classes.json").write_text(json.dumps(classes))
    (site / "index.html").write_text(_index_page(ex, chosen, classes, figures, top, class_top))
    return {"latent_pages": len(chosen), "class_pages": len(classes), "images": n_img + len(figures)}


def _latent_page(ex: Explorer, d: dict) -> str:
    names = ", ".join(f"{escape(n['name'])} ({n['score']:.3f})" for n in d["names"]) or "—"
    q = d["quality"]
    stats = (f'<table><tr><th>kind</th><td>{_badge(d["kind"])}</td></tr><tr><th>names</th><td>{names}'
             f'{"" if d["kind"] == "class-selective" else " (not class-selective: a guess)"}</td></tr>'
             f'<tr><th>class selectivity</th><td>{100 * q["class_share"]:.1f}% of its class-level count in '
             f'{escape(q["top_class"] or "—")} (normalised entropy {q["class_entropy"]:.2f})</td></tr>'
             f'<tr><th>spatial concentration</th><td>{100 * q["position_share"]:.1f}% of its activation mass at '
             f'{escape(q["position"] or "—")}</td></tr>'
             f'<tr><th>frequency</th><td>{100 * d["frequency"]:.2f}% of {d["analysed_images"]} images '
             f'({d["fired_images"]})</td></tr><tr><th>mean activation</th><td>{d["mean_activation"]:.4f}</td></tr>'
             f'<tr><th>label entropy</th><td>{d["entropy"]:.3f} nats{" (low)" if d["low_entropy"] else ""}</td></tr>'
             f'<tr><th>majority label</th><td>{escape(d["majority"] or "—")}</td></tr>'
             f'<tr><th>dataset-level count</th><td>{d["dataset_count"]}</td></tr></table>')
    cc = d["class_counts"]
    shown = sorted(sorted(range(len(cc)), key=lambda i: -cc[i]["count"])[:MAX_CLASS_BARS])  # in class order
    counts = _bars([(cc[i]["class"], cc[i]["count"], f"../classes/{i}.html") for i in shown])
    if len(cc) > MAX_CLASS_BARS:
        counts = f"<p>The {MAX_CLASS_BARS} classes with the largest counts, of {len(cc)}.</p>" + counts
    refs = "".join(f'<figure><img src="../{r["heatmap"]}" alt="reference image {r["index"]}" width="{THUMB}" '
                   f'height="{THUMB}"><figcaption>#{r["index"]} {escape(r["class"])} {r["value"]:.3f}</figcaption>'
                   f'</figure>' for r in d["references"])
    body = (f'<h2>Latent #{d["latent"]} — {escape(d["label"])}</h2>{stats}<h3>Class-level counts (tokens with '
            f'activation &gt; {ex.manifest["tau"]}, summed per class)</h3>{counts}<h3>Reference images '
            f'(image-level activation; heatmap of this latent)</h3><div class="refs">{refs or "none"}</div>')
    return _page(f"latent {d['latent']}", body, 1)


def _class_page(c: dict, details: dict) -> str:
    rows = []
    for s in c["latents"]:
        refs = details[s["latent"]]["references"] if s["latent"] in details else []
        thumb = (f'<img src="../{refs[0]["heatmap"]}" alt="top reference of latent {s["latent"]}" width="56" '
                 f'height="56">' if refs else "")
        rows.append(_latent_row(s, f"../latents/{s['latent']}.html", f"<td>{s['count']}</td><td>{thumb}</td>"))
    how = ("by specificity: the class's share of each latent's class-level count (tokens above tau), largest first"
           if c["order"] == "specificity" else "by class-level count (tokens above tau in the class's images)")
    body = (f'<h2>Class {escape(c["class"])}</h2><p>Latents ranked {how}.</p><table>{LATENT_HEAD}<th>count</th>'
            f'<th>top reference</th></tr>{"".join(rows)}</table>')
    return _page(f"class {c['class']}", body, 1)


def _index_page(ex: Explorer, chosen: list[int], classes: list[dict], figures: list[Path], top: int,
                class_top: int) -> str:
    i = ex.info()
    kinds_line = ", ".join(f"{n} {escape(k)}" for k, n in i["kinds"].items())
    hidden = " and ".join(f"{i['kinds'][k]} {k}" for k in ("dense", "positional"))
    rows = "".join(_latent_row(ex.summary(l), f"latents/{l}.html") for l in chosen)
    cls = "".join(f'<li><a href="classes/{c["index"]}.html">{escape(c["class"])}</a></li>' for c in classes)
    figs = "".join(f'<a href="figures/{p.name}"><img src="figures/{p.name}" alt="{escape(p.name)}"></a>'
                   for p in figures)
    body = (f'<h2>{escape(i["model"])}, block {i["layer"]}, {i["d_sae"]} latents</h2>'
            f'<p>Statistics over {i["dataset"]["analysed_images"]} images of {escape(i["dataset"]["name"])}/'
            f'{escape(i["dataset"]["split"])}; {i["alive_latents"]} latents fired, {i["n_low_entropy"]} with label '
            f'entropy &lt; {i["low_entropy_threshold"]} nats. Kinds: {kinds_line}.</p>'
            f'<p><b>Filter:</b> listed are the {min(top, len(ex.order))} most interpretable latents of the kinds '
            f'{" and ".join(i["shown_by_default"])}: class-selective latents first, by the largest share of their '
            f'class-level count in one class, then label entropy and frequency; {hidden} are left out (the '
            f'explorer shows them on request). Each class\'s top {class_top} are ranked by specificity. '
            f'The same content as JSON: <a href="data/latents.json">latents.json</a>, '
            f'<a href="data/classes.json">classes.json</a>.</p>'
            f'<h3>Classes</h3><ul>{cls}</ul><h3>Latents</h3><table>{LATENT_HEAD}</tr>{rows}</table>'
            f'<h3>Figures</h3><div class="figs">{figs or "none"}</div>')
    return _page(f"run {ex.run.path.name}", body, 0)
