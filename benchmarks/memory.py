"""`make bench` section d: peak resident memory of extracting and of training on 20,000 Fashion-MNIST images
with the embedded model, next to the size of the cache on disk.

Each stage runs in a fresh child process that reports its high-water mark (VmHWM in /proc/self/status), so
one stage's memory does not hide another's; a child that only imports and loads the model gives the floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_IMAGES = int(os.environ.get("BENCH_MEM_IMAGES", 20_000))
TRAIN_STEPS = int(os.environ.get("BENCH_MEM_STEPS", 300))


def status_mb(*keys: str) -> list[float]:
    """Fields of /proc/self/status in MB: VmHWM is the peak resident set; RssAnon / RssFile split the current
    one into process memory and pages of mapped files (the memory-mapped cache: page cache the kernel can
    drop, shared with other readers)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(fields[k].split()[0]) / 1024 for k in keys]


def child(stage: str, folder: str) -> None:
    import torch

    from patchsae.data.base import FirstN
    from patchsae.data.fashion_mnist import FashionMNIST
    from patchsae.models.load import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model = load_model("embedded")
    ds = FirstN(FashionMNIST("train"), N_IMAGES)
    if stage == "extract":
        from patchsae.activations.cache import build_cache

        build_cache(model, ds, -2, Path(folder) / "cache", progress=False)
    elif stage == "train":
        from patchsae.activations.cache import ActivationCache
        from patchsae.activations.tokens import CachedTokens
        from patchsae.runs import EMBEDDED_DEFAULTS as E
        from patchsae.sae.model import SAEConfig
        from patchsae.sae.train import TrainConfig, train_sae

        src = CachedTokens(ActivationCache(Path(folder) / "cache"))
        train_sae(SAEConfig(d_model=model.d_model, d_sae=E["expansion"] * model.d_model, arch="topk", k=E["k"]),
                  TrainConfig(total_tokens=TRAIN_STEPS * E["batch_tokens"], batch_tokens=E["batch_tokens"]),
                  src, Path(folder) / "sae", progress=False)
    print(*(f"{v:.1f}" for v in status_mb("VmHWM", "RssAnon", "RssFile")))


def run_child(stage: str, folder: str) -> tuple[list[float], float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", stage, folder], check=True, capture_output=True,
                         text=True).stdout
    return [float(v) for v in out.split()[-3:]], time.perf_counter() - t


def main() -> None:
    print(f"d. peak memory (RSS high-water mark of a fresh process), embedded model, {N_IMAGES:,} Fashion-MNIST "
          "images", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for stage, what in (("load", "import + load the model (floor)"), ("extract", f"extract {N_IMAGES:,} images"),
                            ("train", f"train {TRAIN_STEPS} steps from the cache")):
            (mb, anon, file), secs = run_child(stage, tmp)
            rows.append((what, mb, anon, file))
            print(f"  {what}: {mb:,.0f} MB peak RSS; at the end {anon:,.0f} MB anonymous + {file:,.0f} MB "
                  f"file-backed ({secs:.0f} s)", flush=True)
        disk = sum(p.stat().st_size for p in (Path(tmp) / "cache").iterdir()) / 2**20
    print(f"  cache on disk: {disk:,.0f} MB")
    print("\n| stage | peak RSS | above the floor | at the end: anonymous / file-backed | cache on disk |\n"
          "|---|---|---|---|---|")
    floor = rows[0][1]
    for what, mb, anon, file in rows:
        print(f"| {what} | {mb:,.0f} MB | {mb - floor:,.0f} MB | {anon:,.0f} / {file:,.0f} MB | {disk:,.0f} MB |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
