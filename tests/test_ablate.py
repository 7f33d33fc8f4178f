"""`patchsae ablate`: Table 2's ablation rows as run configs, one shared cache, one run per row, the table, the memory
cap, resuming and refusing a changed budget."""

from __future__ import annotations

import json
import os
from dataclasses import fields

import pytest

from patchsae import cli
from patchsae.runs import RunConfig
from patchsae.runs.ablation import AblationRow, base_config, equivalent_block, rows, training_bytes


def sig4(x: float) -> str:
    """The tables' number format: four significant digits, trailing zeros kept."""
    return f"{x:#.4g}".rstrip(".")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n_blocks, want", [(12, [1, 4, 7, 10]), (6, [0, 1, 3, 4]), (24, [3, 9, 15, 21]),
                                            (3, [0, 0, 1, 1]), (1, [0, 0, 0, 0])])
def test_equivalent_blocks(n_blocks, want):
    """The paper's layers 2/5/8/11 of 12 (from 1) at the same relative depth; 11 of 12 is index -2 at 6 and 12."""
    assert [equivalent_block(layer, n_blocks) for layer in (2, 5, 8, 11)] == want


def _changed(row: AblationRow, default: RunConfig) -> dict:
    return {f.name: getattr(row.cfg, f.name) for f in fields(RunConfig)
            if getattr(row.cfg, f.name) != getattr(default, f.name)}


def test_rows_each_change_one_setting_of_the_papers_recipe():
    base = base_config(None, {"lr": 2e-3})
    plan = rows(base, 6)
    default = plan[0].cfg
    assert (default.arch, default.objective, default.expansion, default.tokens, default.layer, default.lr,
            default.l1_coeff) == ("relu", "reference", 64, "all", 4, 2e-3, 2.5e-3)
    assert {r.name: _changed(r, default) for r in plan[1:]} == {
        "layer2": {"layer": 0}, "layer5": {"layer": 1}, "layer8": {"layer": 3}, "cls": {"tokens": "cls"},
        "x32": {"expansion": 32}, "x128": {"expansion": 128}, "lambda0x": {"l1_coeff": 0.0},
        "lambda10x": {"l1_coeff": pytest.approx(2.5e-2)}}
    paper = {r.name: r.paper for r in plan if r.paper}
    assert paper == {"default": "paper: ViT-B/16, all tokens, layer 11 (PatchSAE)",
                     "layer5": "paper: ViT-B/16, all tokens, layer 5", "layer8": "paper: ViT-B/16, all tokens, layer 8",
                     "cls": "paper: ViT-B/16, CLS token only, layer 11"}
    # another model keeps the paper's lambda; a 3-block model maps two layers to one block, kept once
    small = rows(base_config("some/clip", {}), 3)
    assert small[0].cfg.l1_coeff == 8e-5 and small[0].cfg.layer == 1
    assert [r.name for r in small if r.group in ("default", "layer")] == ["default", "layer2"]
    assert all(r.unavailable is None for r in plan)
    no_cls = rows(base, 6, has_cls=False)  # SigLIP: the CLS row is listed with its reason, every other row runs
    assert [r.name for r in no_cls if r.unavailable] == ["cls"] and "no CLS token" in no_cls[4].unavailable


def test_training_bytes_counts_the_sae_adam_and_a_step():
    import torch

    from patchsae.sae.model import SAE, SAEConfig

    cfg = RunConfig(expansion=8, batch_tokens=100)
    sae = SAE(SAEConfig(d_model=16, d_sae=128, arch="relu"))
    params = sum(p.numel() for p in sae.parameters())
    assert training_bytes(cfg, 16) == 4 * (4 * params + 3 * 100 * 128)
    assert torch.float32.itemsize == 4


def _stamps(root, names) -> dict:
    return {(n, f): (root / n / f).stat().st_mtime_ns for n in names
            for f in ("sae/model.safetensors", "eval/metrics.json")}


def _ablate(tiny_clip_dir, root, *extra):
    return cli.main(["ablate", "--root", str(root), "--model", str(tiny_clip_dir), "--max-train-images", "60",
                     "--max-eval-images", "30", "--budget-tokens", "2000", "--batch-tokens", "250",
                     "--warmup-steps", "2", "--cl-batch-size", "15", "--l1-coeff", "1e-3", *extra])


def test_ablate_runs_every_row_on_one_cache_and_writes_the_table(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from patchsae.stages import ablate

    root = tmp_path / "ablation"
    x64, x128 = (training_bytes(RunConfig(expansion=e, batch_tokens=250), 32) for e in (64, 128))
    monkeypatch.setattr(ablate, "available_bytes", lambda device: int((x64 + x128) / 2 / ablate.MEMORY_SHARE))
    assert _ablate(tiny_clip_dir, root) == 0
    out = capsys.readouterr().out
    summary = json.loads((root / "ablation.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["default", "layer2", "cls", "x32", "x128", "lambda0x", "lambda10x"]  # 3 blocks: 2 layer rows
    x128_row = summary["rows"][4]
    assert x128_row["run"] is None and "GiB" in x128_row["skipped"] and not (root / "x128").exists()
    assert "Rows not run" in out and "expansion x128: training needs about" in out

    # one shared cache of the two blocks the rows hook; every row's cache is a link into it
    assert sorted(p.name for p in (root / "activations" / "cache" / "train").iterdir()) == ["layer0", "layer1"]
    for r in summary["rows"]:
        if r["run"] is None:
            continue
        run = root / r["name"]
        link = run / "cache" / "train"
        cfg = json.loads((run / "config.json").read_text())
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (root / "activations" / "cache" / "train" / f"layer{cfg['layer']}").resolve()
        metrics = json.loads((run / "eval" / "metrics.json").read_text())
        assert r["metrics"] == metrics
        # the table's row holds this run's Table 2 numbers
        line = next(x for x in out.splitlines() if x.startswith(f"| ours: {r['setting']} |"))
        assert line.split(" | ")[1] == sig4(metrics['normalized_mse'])
        assert line.split(" | ")[5] == sig4(metrics['l0'])
        # every row trains on the budget: 2,000 tokens, in whole steps of 250
        sae_meta = json.loads((run / "sae" / "config.json").read_text())
        assert sae_meta["tokens_trained"] == 2000
    n_images = summary["rows"][0]["metrics"]["n_images"]
    assert summary["rows"][0]["metrics"]["n_tokens"] == n_images * 50  # CLS + 7 x 7 patches
    assert summary["rows"][2]["metrics"]["n_tokens"] == n_images  # the CLS-only SAE is judged on CLS tokens
    assert json.loads((root / "cls" / "config.json").read_text())["tokens"] == "cls"
    assert "paper: ViT-B/16, CLS token only, layer 11" in out

    # rerun with the memory back: the finished rows are kept as they are, the skipped one runs
    monkeypatch.undo()
    kept = [n for n in names if n != "x128"]
    done = _stamps(root, kept)
    assert _ablate(tiny_clip_dir, root) == 0
    assert _stamps(root, kept) == done  # neither retrained nor re-evaluated
    summary = json.loads((root / "ablation.json").read_text())
    assert summary["rows"][4]["skipped"] is None and summary["rows"][4]["metrics"]["l0"] > 0
    assert "Rows not run" not in (root / "ablation.md").read_text()

    # another budget on the same folder is refused in one line, nothing rewritten
    table = (root / "ablation.md").read_text()
    capsys.readouterr()
    assert _ablate(tiny_clip_dir, root, "--budget-tokens", "1000") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("patchsae: error: ") and "was created with epochs=" in err[-1]
    assert "use a new run directory" in err[-1]
    assert (root / "ablation.md").read_text() == table


def test_a_row_the_model_cannot_run_is_listed_with_why(tiny_clip_dir, tmp_path, monkeypatch):
    """A model without a CLS token (SigLIP): the CLS-only row is named in the table with the reason, not run."""
    from patchsae.runs import ablation

    real = ablation.rows
    monkeypatch.setattr(ablation, "rows", lambda base, n, has_cls=True: [
        r for r in real(base, n, has_cls=False) if r.name in ("default", "cls")])
    root = tmp_path / "ablation"
    assert _ablate(tiny_clip_dir, root) == 0
    summary = json.loads((root / "ablation.json").read_text())
    assert [(r["name"], r["skipped"] is None) for r in summary["rows"]] == [("default", True), ("cls", False)]
    assert not (root / "cls").exists()
    assert "- CLS token only: the model has no CLS token" in (root / "ablation.md").read_text()


def test_a_bad_budget_is_refused_before_any_work(tiny_clip_dir, tmp_path, capsys):
    root = tmp_path / "ablation"
    assert _ablate(tiny_clip_dir, root, "--budget-tokens", "0") == 2
    assert capsys.readouterr().err.strip() == "patchsae: error: --budget-tokens must be positive, not 0"
    assert not root.exists()  # no model opened, no cache started


def test_token_mask_selects_the_token_set():
    from patchsae.activations.tokens import token_mask
    from patchsae.models.backbone import TokenLayout

    layout = TokenLayout(n_cls=1, n_prompt=2, grid=(2, 2), n_register=1)
    kinds = layout.kinds()  # cls, register, prompt, prompt, patch x 4
    assert token_mask(kinds, "all").tolist() == layout.image_token_mask().tolist()
    assert token_mask(kinds, "cls").tolist() == [True] + [False] * 7
    assert token_mask(kinds, "all+register").tolist() == [True, True, False, False, True, True, True, True]
