"""The paper's printed numbers (PatchSAE, Lim et al., ICLR 2025; shared/DESIGN.md section 5) and the tables of
`patchsae paper`, which set a run's numbers beside them in the paper's layout. One home for those numbers:
adapt-study's table takes its paper rows from here.

Each table builder takes what the run holds (None where a stage has not run) and returns (markdown lines,
missing), where missing names every row of ours it could not fill and why."""

from __future__ import annotations

from typing import Sequence

# Table 2 (ViT-B/16, hooked block output; MSE / contrastive loss with SAE / original / L1 / L0).
TABLE2_HEAD = ("setting", "MSE", "CL with SAE (CLS)", "CL original", "L1", "L0")
PAPER_TABLE2 = (
    ("paper: ViT-B/16, all tokens, layer 11 (PatchSAE)", "0.0025", "1.885", "1.962", "28.300", "148.56"),
    ("paper: ViT-B/16, CLS token only, layer 11", "0.0009", "1.904", "1.986", "5.501", "25.23"),
    ("paper: ViT-B/16, all tokens, layer 8", "0.0010", "2.034", "2.063", "14.730", "182.07"),
    ("paper: ViT-B/16, all tokens, layer 5", "0.0007", "2.039", "2.039", "10.670", "298.97"),
)
ABLATION_ROWS_MISSING = ("Table 2, ours beside the paper's ablation rows (CLS only, layers 8 and 5): a run holds one "
                         "SAE; `patchsae ablate --root DIR` trains one run per row and writes them in this layout")
# metrics.json keys of our Table 2 row, in TABLE2_HEAD's order after the setting
TABLE2_KEYS = ("normalized_mse", "contrastive_loss_sae_cls", "contrastive_loss_original", "l1", "l0")

# Table 1 (MaPLe base-to-novel on ViT-B/16): CLIP base / novel, MaPLe base / novel, delta (base) %, average
# latents per class in high, high->low, low->high as base / novel.
TABLE1_HEAD = ("dataset", "CLIP base / novel", "MaPLe base / novel", "delta (base) %", "high", "high→low",
               "low→high")
PAPER_TABLE1 = (
    ("StanfordCars", "53.45 / 66.46", "56.16 / 60.63", "5.82", "11.18 / 11.10", "0.00 / 0.12", "0.12 / 0.16"),
    ("FGVC Aircraft", "21.72 / 28.09", "31.19 / 30.07", "12.10", "10.10 / 10.57", "0.31 / 0.32", "0.00 / 0.03"),
    ("ImageNet", "69.88 / 67.23", "73.80 / 68.24", "13.01", "11.05 / 10.82", "0.02 / 0.02", "0.12 / 0.22"),
    ("Food101", "84.85 / 86.65", "87.26 / 89.14", "15.91", "11.24 / 11.58", "0 / 0", "0 / 0"),
    ("SUN397", "68.74 / 72.27", "77.89 / 76.26", "29.27", "11.20 / 11.31", "0.00 / 0.01", "0.02 / 0.02"),
    ("UCF101", "66.56 / 68.80", "81.13 / 71.40", "43.57", "10.90 / 11.10", "0.01 / 0.01", "0.07 / 0.06"),
    ("OxfordPets", "85.41 / 95.26", "92.04 / 94.99", "45.44", "11.11 / 11.73", "0 / 0", "0.24 / 0.16"),
    ("DTD", "53.12 / 53.44", "75.17 / 55.62", "47.03", "8.85 / 8.96", "0.32 / 0.36", "1.68 / 2.02"),
    ("EuroSAT", "42.61 / 62.42", "73.07 / 55.77", "53.08", "6.90 / 8.70", "0.50 / 1.00", "4.10 / 2.30"),
    ("Caltech101", "92.57 / 93.47", "97.49 / 94.29", "66.22", "11.25 / 11.32", "0.02 / 0.00", "0 / 0"),
    ("Flowers102", "56.32 / 69.26", "88.07 / 68.41", "72.69", "10.81 / 11.47", "0.01 / 0.00", "0.01 / 0.01"),
)

# Fig 5b: accuracy under class / dataset / random top-k masking, on / off.
FIG5B_COLUMNS = tuple((s, m) for s in ("class", "dataset", "random") for m in ("on", "off"))


def paper_table1_rows(names: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """The paper's Table 1 rows (all, or those named), labelled as the paper's."""
    return [(f"{r[0]} (paper, ViT-B/16)", *r[1:]) for r in PAPER_TABLE1 if names is None or r[0] in names]


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _num(x) -> str:
    """Four significant digits, trailing zeros kept (3.000, not 3), as the paper prints its columns."""
    return "—" if x is None else f"{x:#.4g}".rstrip(".")


def table2(metrics: dict | None, setting: str) -> tuple[list[str], list[str]]:
    """Table 2: our row from eval/metrics.json (None if absent) above the paper's rows."""
    missing = [ABLATION_ROWS_MISSING]
    if metrics is None:
        missing.append(f"Table 2, ours ({setting}): no eval/metrics.json; run `patchsae evaluate`")
        rows = []
    else:
        absent = [k for k in TABLE2_KEYS if metrics.get(k) is None]
        if absent:
            why = ("the contrastive losses were skipped (--cl-batch-size 0); rerun `patchsae evaluate`"
                   if all(k.startswith("contrastive") for k in absent) else
                   "eval/metrics.json predates Table 2's metrics; rerun `patchsae evaluate`")
            missing.append(f"Table 2, ours ({setting}): {', '.join(absent)} missing: {why}")
        rows = [(f"ours: {setting}", *(_num(metrics.get(k)) for k in TABLE2_KEYS))]
    return markdown(TABLE2_HEAD, rows + list(PAPER_TABLE2)), missing


def fig5b(rows: list[dict] | None, manifest: dict | None) -> tuple[list[str], list[str]]:
    """Fig 5b in a table: k down the side, selection x mode across, accuracy in %, from classify's
    metrics.csv rows (selection, mode, k, accuracy as strings) and manifest."""
    missing = ["Fig 5b, the paper's numbers: the paper prints Fig 5b as a plot only (DESIGN.md section 5 has no "
               "numbers for it), so no printed row stands beside ours"]
    if rows is None or manifest is None:
        missing.insert(0, "Fig 5b, ours: no DIR/classify/metrics.csv and manifest.json; run `patchsae classify "
                          "--protocol reference` (the paper's protocol) or `patchsae classify`")
        return [], missing
    acc = {(r["selection"], r["mode"], r["k"]): float(r["accuracy"]) for r in rows}
    base = {m: acc.get(("none", m, "")) for m in ("original", "reconstruction", "error_kept")}
    protocol = manifest.get("protocol", "ours")
    shift = manifest.get("splice_shift", {}).get("value", 0.0)
    lines = [f"protocol {protocol} (ranked on {manifest['rank_split']}, {manifest['rank_images']} images; evaluated "
             f"on {manifest['eval_split']}, {manifest['eval_images']} images; text head "
             f"{'' if manifest.get('text_head_renormalised', True) else 'not '}re-normalised; splice shift "
             f"{shift:.6g}); original {_pct(base['original'])}, reconstruction {_pct(base['reconstruction'])}",
             ""]
    if protocol != "reference":
        missing.insert(0, "Fig 5b, ours under the paper's protocol: classify ran with --protocol ours; rerun with "
                          "--protocol reference for the paper's (in-sample, shifted splice) setting")
    ks = sorted({int(r["k"]) for r in rows if r["k"] != ""})
    body = [(f"{k:,}" + (" (all)" if k == manifest.get("d_sae") else ""),
             *(_pct(acc.get((s, m, str(k)))) for s, m in FIG5B_COLUMNS)) for k in ks]
    return lines + markdown(("k", *(f"{s} {m}" for s, m in FIG5B_COLUMNS)), body), missing


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def table1(study_rows: list[tuple[str, ...]] | None, rule: dict | None = None) -> tuple[list[str], list[str]]:
    """Table 1: adapt-study's rows (None if it has not run) above the paper's eleven; `rule` = the study's compare
    options (top_n, low_rank) for naming the group rule used."""
    top_n = (rule or {}).get("top_n") or 50
    low_rank = (rule or {}).get("low_rank") or 2 * top_n
    missing = [f"Table 1, group columns: ours use the rank rule (high = top-{top_n} by class-level count, low = rank "
               f">= {low_rank} or never counted); the paper's own rule could not be found (docs/adaptation.md), so "
               "the group columns are not the paper's measure"]
    if study_rows is None:
        missing.insert(0, "Table 1, ours: no DIR/adapt-study/summary.json; run `patchsae adapt-study`")
        study_rows = []
    return markdown(TABLE1_HEAD, list(study_rows) + paper_table1_rows()), missing


# `patchsae ablate`: Table 2's columns, then two of ours that say how good a row's SAE is on this model
ABLATION_HEAD = TABLE2_HEAD + ("EV", "spliced acc. %")
PAPER_TABLE2_BY_LABEL = {r[0]: r for r in PAPER_TABLE2}


def ablation_table(entries: Sequence[tuple[str, dict | None, str | None]]) -> list[str]:
    """Table 2's layout for the ablation: per entry (setting, eval/metrics.json or None when the row did not
    run, label of the paper's row for the same setting or None) our row, then the paper's where it printed one."""
    rows = []
    for setting, metrics, paper_label in entries:
        m = metrics or {}
        rows.append((f"ours: {setting}", *(_num(m.get(k)) for k in TABLE2_KEYS), _num(m.get("explained_variance")),
                     _pct(m.get("spliced_accuracy"))))
        if paper_label is not None:
            rows.append((*PAPER_TABLE2_BY_LABEL[paper_label], "—", "—"))
    return markdown(ABLATION_HEAD, rows)
