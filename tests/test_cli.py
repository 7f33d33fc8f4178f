"""The command line: help, the quickstart end to end on a tiny random CLIP, reuse on rerun, and error paths
(one line on stderr, exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patchsae import cli
from patchsae.runs import Run, RunConfig
from patchsae.stages.quickstart import SUMMARY_KEYS

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--max-train-images", "300", "--max-eval-images", "200", "--expansion", "4", "--warmup-steps", "5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _patchsae(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "patchsae", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("patchsae: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


# ---- help ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["cache", "--help"], ["train", "--help"], ["evaluate", "--help"],
                                  ["quickstart", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: patchsae" in out
    if argv[0] in ("cache", "train", "quickstart"):
        for opt in ("--run", "--model", "--layer", "--expansion", "--max-train-images"):
            assert opt in out, opt


def test_console_script_help():
    exe = Path(sys.executable).parent / "patchsae"
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "quickstart" in proc.stdout


# ---- quickstart end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tiny_clip_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("quick") / "run"
    rc = cli.main(["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), *QUICK])
    assert rc == 0
    return run


def test_quickstart_summary(quick_run, tiny_clip_dir):
    summary = json.loads((quick_run / "summary.json").read_text())
    assert "table2" not in summary  # Table 2's metrics are top-level keys, not a nested copy
    for key in ("model", "dataset", "layer", "d_model", "d_sae", "arch", "tokens_trained", "mse",
                "explained_variance", "l0_per_token", "dead_fraction", "zero_shot_accuracy", "spliced_accuracy",
                "zero_ablated_accuracy", "seconds"):
        assert key in summary, key
    assert set(SUMMARY_KEYS) <= set(summary)

    assert summary["model"] == str(tiny_clip_dir)
    assert summary["dataset"] == "fashion-mnist"
    assert summary["layer"] == 1  # -2 of the tiny model's 3 blocks
    assert summary["d_model"] == 32 and summary["d_sae"] == 4 * 32
    assert summary["arch"] == "relu"
    # one epoch over the cached tokens: 300 images x (1 CLS + (28/4)^2 patches), rounded up to whole steps
    n_tokens = 300 * (1 + (28 // 4) ** 2)
    batch = RunConfig().batch_tokens
    assert n_tokens <= summary["tokens_trained"] < n_tokens + batch
    assert summary["tokens_trained"] % batch == 0

    for key in ("zero_shot_accuracy", "spliced_accuracy", "zero_ablated_accuracy", "dead_fraction"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["mse"] >= 0 and summary["explained_variance"] <= 1.0
    assert 0 <= summary["l0_per_token"] <= summary["d_sae"]
    assert summary["seconds"] >= 0

    # the summary reports what evaluation measured
    metrics = json.loads((quick_run / "eval" / "metrics.json").read_text())
    for key in ("mse", "explained_variance", "l0_per_token", "dead_fraction", "zero_shot_accuracy",
                "spliced_accuracy", "zero_ablated_accuracy"):
        assert summary[key] == metrics[key], key
    assert metrics["eval_images"] == 200
    # Table 2's metrics, in both files; one contrastive batch of 128 of the 200 images
    for key in ("normalized_mse", "l1", "l0", "explained_variance_uncentred", "contrastive_loss_original",
                "contrastive_loss_sae_cls", "contrastive_loss_zero_cls", "contrastive_loss_score",
                "contrastive_loss_sae_all", "contrastive_loss_zero_all", "contrastive_loss_score_all"):
        assert summary[key] == metrics[key] and metrics[key] is not None, key
    assert metrics["cl_batch_size"] == 128 and metrics["cl_batches"] == 1
    assert metrics["l0"] == metrics["l0_per_token"] and metrics["normalized_mse"] > 0 and metrics["l1"] > 0
    assert metrics["explained_variance_uncentred"] >= metrics["explained_variance"]

    png = quick_run / "figures" / "log_density.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("model.safetensors", "config.json"):
        assert (quick_run / "sae" / name).is_file()
    leftovers = [p for p in quick_run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_quickstart_rerun_reuses_cache_and_sae(quick_run, tiny_clip_dir, monkeypatch):
    before = json.loads((quick_run / "summary.json").read_text())
    cache_files = {p: p.stat().st_mtime_ns for p in (quick_run / "cache").rglob("*") if p.is_file()}
    assert any(p.suffix == ".npy" for p in cache_files)
    ckpt = quick_run / "sae" / "checkpoint.safetensors"
    ckpt_mtime = ckpt.stat().st_mtime_ns
    weights = (quick_run / "sae" / "model.safetensors").read_bytes()

    from patchsae.sae.model import SAE

    def no_training(*a, **k):
        raise AssertionError("the rerun trained the SAE again")

    monkeypatch.setattr(SAE, "loss", no_training)
    rc = cli.main(["quickstart", "--run", str(quick_run), "--model", str(tiny_clip_dir), *QUICK])
    assert rc == 0

    assert {p: p.stat().st_mtime_ns for p in cache_files} == cache_files
    assert ckpt.stat().st_mtime_ns == ckpt_mtime
    assert (quick_run / "sae" / "model.safetensors").read_bytes() == weights
    after = json.loads((quick_run / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        if key != "seconds":
            assert after[key] == before[key], key


# ---- error paths -------------------------------------------------------------------------------------------

def test_unknown_layer_is_one_line_error(tiny_clip_dir, tmp_path):
    proc = _patchsae("quickstart", "--run", tmp_path / "run", "--model", tiny_clip_dir, "--layer", "99", *QUICK)
    _assert_one_line_error(proc, "99")
    assert not (tmp_path / "run" / "cache").exists() or not any((tmp_path / "run" / "cache").rglob("*.npy"))


def test_rejected_layer_does_not_lock_the_run_directory(tiny_clip_dir, tmp_path, capsys):
    """A typo in --layer is refused; correcting it and rerunning in the same directory must then work, not
    fail with 'was created with layer=99'."""
    run = tmp_path / "run"
    assert cli.main(["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), "--layer", "99", *QUICK]) == 2
    assert "99" in capsys.readouterr().err
    # what `patchsae quickstart --run RUN --model M --layer -2 ...` does first: accept the corrected settings
    overrides = cli.given(cli.build_parser().parse_args(
        ["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), "--layer", "-2", *QUICK]), RunConfig)
    Run(run).init(RunConfig(), overrides)


def test_evaluate_without_sae_is_one_line_error(tiny_clip_dir, tmp_path):
    run = tmp_path / "run"
    Run(run).init(RunConfig(model=str(tiny_clip_dir), max_eval_images=20), {})
    proc = _patchsae("evaluate", "--run", run)
    _assert_one_line_error(proc, "SAE")
    assert not (run / "eval").exists() and not (run / "figures").exists()


def test_evaluate_on_a_folder_that_is_no_run(tmp_path, capsys):
    # in-process (a subprocess costs seconds of imports): main returns 2 and prints one line
    assert cli.main(["evaluate", "--run", str(tmp_path / "nothing_here")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("patchsae: error: ") and "nothing_here" in lines[0]


def test_run_dir_reused_with_another_model_is_refused(quick_run, tmp_path):
    config_before = (quick_run / "config.json").read_bytes()
    summary_before = (quick_run / "summary.json").read_bytes()
    proc = _patchsae("quickstart", "--run", quick_run, "--model", tmp_path / "another_clip", *QUICK)
    _assert_one_line_error(proc, "model")
    assert (quick_run / "config.json").read_bytes() == config_before
    assert (quick_run / "summary.json").read_bytes() == summary_before


def test_quickstart_with_the_reference_objective(tiny_clip_dir, tmp_path):
    """--objective and --mse-cls-coefficient reach the trained SAE (CLS rows from the cache), and
    --cl-batch-size 0 leaves the contrastive losses out."""
    from patchsae.sae.checkpoint import load_sae
    from patchsae.sae.model import ReferenceReLUSAE

    run = tmp_path / "run"
    rc = cli.main(["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), *QUICK, "--arch", "relu",
                   "--objective", "reference", "--mse-cls-coefficient", "0.5", "--l1-coeff", "1e-3",
                   "--cl-batch-size", "0"])
    assert rc == 0
    sae, meta = load_sae(run / "sae")
    assert type(sae) is ReferenceReLUSAE and sae.input_scale.item() == 1.0
    assert meta["sae"]["objective"] == "reference" and meta["sae"]["mse_cls_coefficient"] == 0.5
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["contrastive_loss_original"] is None and metrics["cl_batches"] == 0
    assert json.loads((run / "config.json").read_text())["objective"] == "reference"


def test_precision_and_worker_options_reach_cache_and_training(tiny_clip_dir, tmp_path, capsys):
    """--dtype and --sae-dtype are part of the run's config (the cache's manifest and the SAE's training
    settings record them); --workers decodes in worker processes and is not; a precision the package does
    not know is refused by the parser."""
    run = tmp_path / "run"
    assert cli.main(["cache", "--run", str(run), "--model", str(tiny_clip_dir), "--max-train-images", "40",
                     "--dtype", "bf16", "--sae-dtype", "bf16", "--expansion", "2", "--workers", "2"]) == 0
    cfg = Run(run).load_config()
    assert (cfg.dtype, cfg.sae_dtype) == ("bf16", "bf16")
    assert json.loads((Run(run).cache_dir("train") / "manifest.json").read_text())["extract_dtype"] == "bf16"
    assert cli.main(["train", "--run", str(run), "--workers", "2"]) == 0
    assert json.loads((Run(run).sae_dir / "config.json").read_text())["train"]["sae_dtype"] == "bf16"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["cache", "--run", str(tmp_path / "other"), "--dtype", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
