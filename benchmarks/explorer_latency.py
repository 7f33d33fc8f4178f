"""Latency of the explorer's API on a real run, as the browser sees it (through the ASGI app, JSON included),
next to a bare CLIP image forward of the same image in the same process as the baseline.

    .venv/bin/python benchmarks/explorer_latency.py --run runs/quickstart [--reps 20]

Prints, per request, the median and worst time over the repetitions and the ratio of the median to the bare
forward. Uploads: a 28 px Fashion-MNIST test image as PNG, and a 1024x768 RGB JPEG (decode + resize included).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from patchsae.data.fashion_mnist import FashionMNIST
    from patchsae.explorer.server import create_app
    from patchsae.explorer.session import Explorer
    from patchsae.runs import Run

    t0 = time.perf_counter()
    ex = Explorer(Run(args.run))
    t_open = time.perf_counter() - t0
    client = TestClient(create_app(ex))
    small = encoded(FashionMNIST("test").load(0)[0], "PNG")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    large = encoded(photo, "JPEG")
    model = ex.models["base"]
    pixels = model.preprocess([FashionMNIST("test").load(0)[0]])

    def post(data: bytes, name: str):
        r = client.post("/api/analyze", files={"file": (name, data, "application/octet-stream")})
        assert r.status_code == 200, r.text
        return r.json()

    a = post(small, "x.png")
    iid, latent = a["image_id"], a["models"]["base"]["top_latents"][0]["latent"]
    rows = [
        ("bare CLIP image forward (baseline)", lambda: model.image_features(pixels)),
        ("POST /api/analyze, 28 px PNG", lambda: post(small, "x.png")),
        (f"POST /api/analyze, 1024x768 JPEG ({len(large) // 1024} KB)", lambda: post(large, "x.jpg")),
        ("GET  patch top latents", lambda: client.get(f"/api/images/{iid}/patch?row=3&col=3")),
        ("GET  heatmap PNG (224 px)", lambda: client.get(f"/api/images/{iid}/image.png?latent={latent}&kind=heatmap")),
        ("GET  latent statistics", lambda: client.get(f"/api/latents/{latent}")),
        ("POST /api/steer (all tokens)", lambda: client.post("/api/steer", json={"image_id": iid, "latent": latent,
                                                                                 "scale": 3.0})),
        ("GET  latent search 'shirt'", lambda: client.get("/api/latents?q=shirt")),
    ]
    print(f"run {args.run}: {ex.d_sae} latents, model {model.name}; opened in {t_open:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    base = None
    for name, fn in rows:
        with torch.no_grad():
            ts = timed(fn, args.reps)
        med = statistics.median(ts)
        base = base or med
        print(f"{name:<44} median {1000 * med:8.1f} ms   worst {1000 * max(ts):8.1f} ms   {med / base:7.1f} x forward")


if __name__ == "__main__":
    main()
