"""The explorer under load: 1,000 API requests (uploads, patch queries, heatmaps, steering) from 64 concurrent
clients over loopback to a real uvicorn server in its own process, while one slow client sends an upload body
byte by byte. A benchmark, not a test: it prints throughput, latency percentiles and the server's peak RSS.

    PYTHONPATH=src python benchmarks/explorer_load.py [--run RUN] [--requests 1000] [--clients 64]

Without --run it builds a throwaway run: the embedded CLIP, a random SAE (16 x width latents) and `analyze` on
200 Fashion-MNIST test images. Checked for every response: 200 with the expected body (JSON fields, a PNG
signature), or a 4xx/503 whose body is one JSON line {"error": ...}. The slow client must get 408 after the
body time limit while the others keep being served. Memory: the server's peak RSS (VmHWM) against its RSS
once warm plus the explorer's configured image-cache budget.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CACHE_BUDGET = 256 << 20  # the explorer's image-cache byte budget in this benchmark
BODY_SECONDS = 5.0


def serve_main(run: str, port: int) -> None:
    """The server process: the explorer on `run` with this benchmark's limits."""
    import uvicorn

    from patchsae.explorer.server import Limits, create_app
    from patchsae.explorer.session import Explorer
    from patchsae.runs import Run

    import torch

    torch.set_num_threads(1)
    app = create_app(Explorer(Run(run), max_bytes=CACHE_BUDGET), limits=Limits(body_seconds=BODY_SECONDS))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def build_run(folder: Path) -> str:
    import torch

    from patchsae.models.load import load_model
    from patchsae.runs import Run, RunConfig
    from patchsae.stages.analyze import AnalyzeOptions
    from patchsae.stages.analyze import run as stage_analyze
    from patchsae.sae.checkpoint import save_sae
    from patchsae.sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    run = Run(folder / "run")
    run.init(RunConfig(), {})
    width = load_model("embedded").d_model
    save_sae(run.sae_dir, SAE(SAEConfig(d_model=width, d_sae=16 * width)))
    stage_analyze(run, AnalyzeOptions(max_images=200, batch_size=100), progress=False)
    return str(run.path)


def png_bytes(seed: int, size: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def check(r, kind: str) -> str:
    """'ok' or 'refused' (a 4xx/503 with one JSON error line); anything else raises."""
    if r.status_code == 200:
        if kind == "png":
            assert r.content.startswith(b"\x89PNG\r\n\x1a\n"), r.content[:20]
        else:
            body = r.json()
            assert isinstance(body, dict) and "error" not in body, body
        return "ok"
    assert 400 <= r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:200])
    assert "\n" not in r.text.strip() and list(r.json()) == ["error"], r.text[:200]
    return "refused"


def client(base: str, n: int, seed: int, out: list) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=120) as c:
        image_id, latent = None, 0
        for i in range(n):
            kind = ("upload", "patch", "heatmap", "steer")[i % 4] if image_id else "upload"
            t = time.perf_counter()
            if kind == "upload":
                r = c.post("/api/analyze", files={"file": ("x.png", png_bytes(seed * 1000 + i), "image/png")})
                status = check(r, "json")
                if status == "ok":
                    body = r.json()
                    image_id = body["image_id"]
                    latent = body["models"]["base"]["top_latents"][0]["latent"]
            elif kind == "patch":
                status = check(c.get(f"/api/images/{image_id}/patch", params={"row": 1, "col": 2}), "json")
            elif kind == "heatmap":
                status = check(c.get(f"/api/images/{image_id}/image.png",
                                     params={"latent": latent, "kind": "heatmap"}), "png")
            else:
                status = check(c.post("/api/steer", json={"image_id": image_id, "latent": latent, "scale": 2.0}),
                               "json")
            out.append((kind, status, time.perf_counter() - t))


def slow_client(port: int, result: dict) -> None:
    """An upload whose body trickles in one byte every 20 ms: it must be cut off with 408 after the limit."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png_bytes(7) + b"\r\n--b--\r\n")
    head = (f"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        s.settimeout(0.02)
        reply = b""
        for byte in body:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            try:
                reply += s.recv(65536)
                if reply:
                    break
            except (socket.timeout, BlockingIOError):
                pass
        s.settimeout(30)
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    result["status"] = reply.split(b" ", 2)[1].decode() if reply else "none"
    result["seconds"] = time.perf_counter() - t
    result["reply"] = reply.split(b"\r\n\r\n", 1)[-1][:120].decode(errors="replace")


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--serve", nargs=2, metavar=("RUN", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_main(args.serve[0], int(args.serve[1]))
    import httpx

    tmp = tempfile.TemporaryDirectory()
    run = args.run or build_run(Path(tmp.name))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, __file__, "--serve", run, str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client(base, 8, 999, [])  # warm-up: every code path once
        warm_kib = rss_kib(server.pid, "VmRSS")
        results, threads, slow = [], [], {}
        per = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
        slow_thread = threading.Thread(target=slow_client, args=(port, slow))
        t0 = time.perf_counter()
        slow_thread.start()
        for i, n in enumerate(per):
            threads.append(threading.Thread(target=client, args=(base, n, i, results)))
            threads[-1].start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        slow_thread.join()
        peak_kib = rss_kib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait()
    lat = sorted(r[2] for r in results)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
    by_status = {s: sum(r[1] == s for r in results) for s in ("ok", "refused")}
    print(f"{len(results)} requests from {args.clients} clients in {wall:.1f} s: {len(results) / wall:.1f} req/s; "
          f"{by_status['ok']} ok, {by_status['refused']} refused (4xx/503, one JSON line), 0 malformed")
    print(f"latency ms: p50 {q(0.5):.0f}, p90 {q(0.9):.0f}, p99 {q(0.99):.0f}, max {lat[-1] * 1000:.0f}")
    for kind in ("upload", "patch", "heatmap", "steer"):
        k = sorted(r[2] for r in results if r[0] == kind)
        if k:
            print(f"  {kind:8s} n={len(k):4d}  p50 {statistics.median(k) * 1000:6.0f} ms  "
                  f"p99 {k[min(len(k) - 1, int(0.99 * len(k)))] * 1000:6.0f} ms")
    print(f"slow byte-by-byte upload: HTTP {slow.get('status')} after {slow.get('seconds', 0):.1f} s "
          f"(body limit {BODY_SECONDS:g} s): {slow.get('reply')}")
    print(f"server RSS: {warm_kib / 1024:.0f} MiB warm, peak {peak_kib / 1024:.0f} MiB; budget warm + image cache "
          f"{CACHE_BUDGET >> 20} MiB = {(warm_kib >> 10) + (CACHE_BUDGET >> 20)} MiB: "
          f"{'within' if peak_kib <= warm_kib + (CACHE_BUDGET >> 10) else 'OVER'}")


if __name__ == "__main__":
    main()
