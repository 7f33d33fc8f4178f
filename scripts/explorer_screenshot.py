"""Take the explorer's screenshot (README.md, docs/explorer.md): serve a run on a free local port, drive the page
in headless Debian chromium (load a dataset image, click a patch, select its top latent, show the heatmap, steer
the latent off) and save a PNG quantised to 256 colours.

    .venv/bin/python scripts/explorer_screenshot.py --run runs/quickstart --out docs/explorer.png
"""

from __future__ import annotations

import argparse
import io
import socket
import threading
import time

from PIL import Image

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--out", default="docs/explorer.png")
    ap.add_argument("--image", type=int, default=0, help="dataset index of the image shown")
    ap.add_argument("--patch", type=int, nargs=2, default=(3, 3), metavar=("ROW", "COL"))
    ap.add_argument("--scale", type=float, default=0.0, help="steering scale shown")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from patchsae.explorer.server import create_app
    from patchsae.explorer.session import Explorer
    from patchsae.runs import Run

    ex = Explorer(Run(args.run))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(ex), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    rows, cols = ex.models["base"].layout().grid
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1']")
        page.fill("#ds-index", str(args.image))
        page.click("#ds-load")
        page.wait_for_selector("#image-latents .bar")
        box = page.locator("#grid").bounding_box()
        r, c = args.patch
        page.mouse.click(box["x"] + box["width"] * (c + 0.5) / cols, box["y"] + box["height"] * (r + 0.5) / rows)
        page.wait_for_selector("#patch-latents .bar")
        page.click("#patch-latents .bar >> nth=0")
        page.wait_for_selector("#references img")
        page.check("input[name=view][value=heatmap]")
        page.fill("#steer-scale", str(args.scale))
        page.dispatch_event("#steer-scale", "input")
        page.click("#steer-run")
        page.wait_for_selector("#steer-result table")
        page.wait_for_function("Array.from(document.images).every(i => i.complete)")
        png = page.screenshot()
        browser.close()
    srv.should_exit = True
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(256)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({img.size[0]}x{img.size[1]})")


if __name__ == "__main__":
    main()
