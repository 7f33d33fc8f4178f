"""The benchmark scripts' contracts that are not timings: results.json's stable keys and merging, and the GPU
script's refusal without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_results_file_keeps_every_printed_ratio_under_its_key_and_merges(tmp_path, monkeypatch, capsys):
    import bench

    monkeypatch.setattr(bench, "RESULTS_FILE", tmp_path / "bench" / "results.json")
    monkeypatch.setattr(bench, "RESULTS", {})
    monkeypatch.setattr(bench, "ROWS", [])
    bench.row("a", "topk_vs_gemm_bound", "TopK vs bound", 0.61234, times=False)
    bench.row("a", "topk_vs_saelens", "TopK vs SAELens", None, failed="SAELens failed")
    bench.write_results("bench.py a", 12.3)
    printed = capsys.readouterr().out
    assert "0.61" in printed and "SAELens failed" in printed
    monkeypatch.setattr(bench, "RESULTS", {})
    bench.row("b", "early_exit_block11", "block 11", 1.1, times=True)
    bench.write_results("bench.py b", 1.0, {"note": "second run"})
    saved = json.loads(bench.RESULTS_FILE.read_text())
    assert saved["ratios"] == {"topk_vs_gemm_bound": 0.6123, "topk_vs_saelens": None, "early_exit_block11": 1.1}
    assert set(saved["runs"]) == {"bench.py a", "bench.py b"} and saved["runs"]["bench.py b"]["note"] == "second run"
    assert saved["runs"]["bench.py a"]["threads"] == torch.get_num_threads()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_benchmark_refuses_without_cuda_in_one_line():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("benchmarks/gpu.py: error: no CUDA device")
