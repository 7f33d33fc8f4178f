"""The `analyze` pass's bookkeeping against the SAE encode it follows: time of `LatentAccumulator.update`
(top-k tables, class counts, and the concept-quality statistics: position mass, fired tokens, images per
class) as a ratio of the encode of the same codes, at the embedded model's size (50 tokens x 1,536 latents,
64 images) and at ViT-B/16 x64 (197 tokens x 49,152 latents, one encode chunk of 3 images). Also the share of
the update spent on the concept-quality statistics alone, and the accumulator's bytes.

    PYTHONPATH=src python benchmarks/analyze_stats.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import best_time  # noqa: E402

from patchsae.analysis.latents import LatentAccumulator  # noqa: E402
from patchsae.sae.model import SAE, SAEConfig  # noqa: E402


def one(name: str, d_model: int, d_sae: int, tokens: int, images: int, classes: int = 10) -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=d_model, d_sae=d_sae, arch="topk", k=64 if d_sae > 4096 else 24)).eval()
    h_BTD = torch.randn(images, tokens, d_model)
    with torch.no_grad():
        f_BTS = sae.encode(h_BTD)
    label_B, index_B = torch.randint(0, classes, (images,)), torch.arange(images)
    patch_T = torch.arange(tokens) > 0
    acc = LatentAccumulator(d_sae, classes, tokens)

    def encode():
        with torch.no_grad():
            sae.encode(h_BTD)

    def quality():  # the three statistics the kinds need, as `update` computes them
        acc.position_mass_TS.add_(f_BTS.sum(0).double())
        acc.token_fired_S.add_((f_BTS > 0).sum((0, 1), dtype=torch.int32))
        acc.class_images_C.add_(torch.bincount(label_B, minlength=classes))

    t_enc = best_time(encode, 3)
    t_upd = best_time(lambda: acc.update(f_BTS, label_B, index_B, patch_T), 3)
    t_q = best_time(quality, 3)
    print(f"{name}: update / encode = {t_upd / t_enc:.2f}; concept-quality part / update = {t_q / t_upd:.2f}; "
          f"accumulator {acc.nbytes() / 2**20:.1f} MiB")


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    one("embedded (64 images x 50 tokens x 1,536)", 96, 1536, 50, 64)
    if os.environ.get("BENCH_SMALL") != "1":
        one("ViT-B/16 x64 (3 images x 197 tokens x 49,152)", 768, 49_152, 197, 3)


if __name__ == "__main__":
    main()
