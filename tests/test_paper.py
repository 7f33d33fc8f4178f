"""`patchsae paper`: the tables file on a tiny run, our Table 2 row read from eval/metrics.json, Fig 5b from
classify's outputs, and every row it cannot fill named with why."""

from __future__ import annotations

import csv

import pytest

from patchsae import cli
from patchsae.analysis import paper
from patchsae.runs import Run
from patchsae.stages.adapt_study import table_rows
from patchsae.utils import read_json


def sig4(x: float) -> str:
    """The tables' number format: four significant digits, trailing zeros kept."""
    return f"{x:#.4g}".rstrip(".")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run("paper")


def test_paper_writes_the_tables_and_names_missing_rows(tiny_run, capsys):
    capsys.readouterr()
    assert cli.main(["paper", "--run", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    text = (tiny_run / "paper" / "tables.md").read_text()
    assert Run(tiny_run).paper_dir / "tables.md" == tiny_run / "paper" / "tables.md"
    assert text in out
    m = read_json(tiny_run / "eval" / "metrics.json")
    ours = next(line for line in text.splitlines() if line.startswith("| ours: "))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[1] == sig4(m['normalized_mse']) and cells[4] == sig4(m['l1']) and cells[5] == sig4(m['l0'])
    for k, cell in zip(("contrastive_loss_sae_cls", "contrastive_loss_original"), cells[2:4]):
        assert cell == ("—" if m[k] is None else sig4(m[k]))
    assert "| paper: ViT-B/16, all tokens, layer 11 (PatchSAE) | 0.0025 | 1.885 | 1.962 | 28.300 | 148.56 |" in text
    assert text.count("(paper, ViT-B/16)") == 11  # all of Table 1's rows
    missing = text.split("## Rows not filled")[1]
    assert "Fig 5b, ours: no DIR/classify/metrics.csv" in missing and "patchsae classify" in missing
    assert "Table 1, ours: no DIR/adapt-study/summary.json; run `patchsae adapt-study`" in missing
    assert "Fig 5b, the paper's numbers" in missing and "rank rule" in missing
    assert "`patchsae ablate --root DIR`" in missing  # the paper's other Table 2 rows

    # after classify under the paper's protocol, Fig 5b's rows come from its metrics.csv
    assert cli.main(["classify", "--run", str(tiny_run), "--protocol", "reference", "--max-rank-images", "30",
                     "--max-eval-images", "30", "--batch-size", "30"]) == 0
    assert cli.main(["paper", "--run", str(tiny_run)]) == 0
    text = (tiny_run / "paper" / "tables.md").read_text()
    assert "Fig 5b, ours:" not in text and "protocol reference (ranked on train" in text
    rows = list(csv.DictReader((tiny_run / "classify" / "metrics.csv").open()))
    acc = {(r["selection"], r["mode"], r["k"]): float(r["accuracy"]) for r in rows}
    k10 = next(line for line in text.splitlines() if line.startswith("| 10 |"))
    want = [f"{100 * acc[(s, mo, '10')]:.2f}" for s, mo in paper.FIG5B_COLUMNS]
    assert [c.strip() for c in k10.strip("|").split("|")][1:] == want
    assert "| 128 (all) |" in text  # d_sae = 4 x 32


def test_paper_refuses_a_broken_metrics_file(tiny_run, capsys, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    (broken / "eval" / "metrics.json").write_text("{not json")
    before = (broken / "paper" / "tables.md").read_text() if (broken / "paper" / "tables.md").exists() else None
    capsys.readouterr()
    assert cli.main(["paper", "--run", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "metrics.json: not valid JSON" in err and len(err.strip().splitlines()) == 1
    now = (broken / "paper" / "tables.md").read_text() if (broken / "paper" / "tables.md").exists() else None
    assert now == before  # nothing already written is lost


def test_table1_sets_adapt_study_rows_above_the_papers():
    results = {"digits": {"accuracy": {"base": {"zero_shot": 40.0, "adapted": 70.0, "delta": 50.0},
                                       "novel": {"zero_shot": 30.0, "adapted": 35.5}},
                          "groups": {"high": {"base": 47.2, "novel": 45.0}, "high_to_low": {"base": 1.0, "novel": 0.0},
                                     "low_to_high": {"base": 2.5, "novel": None}}}}
    lines, missing = paper.table1(table_rows(results))
    assert lines[2] == "| digits (embedded) | 40.00 / 30.00 | 70.00 / 35.50 | 50.00 | 47.20 / 45.00 | 1.00 / 0.00 | " \
                       "2.50 / — |"
    assert len(lines) == 2 + 1 + 11 and not any("Table 1, ours" in m for m in missing)
    assert paper.table2(None, "x")[1] == [paper.ABLATION_ROWS_MISSING,
                                          "Table 2, ours (x): no eval/metrics.json; run `patchsae evaluate`"]
