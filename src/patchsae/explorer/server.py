"""`patchsae serve`: the explorer's JSON API and its page (static HTML/JS/CSS, no build step).

Every response body of /api is JSON or a PNG; every error is JSON {"error": "<one line>"} with a 4xx status.
The server reads no path the client sends: images are addressed by ids it handed out, figures by an exact
name from the run's figures folder, and static files come from the package's own folder.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchsae import PatchSAEError
from patchsae.analysis.figures import listed_figures
from patchsae.analysis.kinds import KINDS, SHOWN_BY_DEFAULT
from patchsae.explorer.blocks import Blocks
from patchsae.explorer.session import STATIC_DIR, Explorer, NotAnImage, UnknownImage

MAX_UPLOAD = 10 * 1024 * 1024
IMAGE_ID = re.compile(r"^(ds-[0-9]{1,9}|[0-9a-f]{16})$")


@dataclass(frozen=True)
class Limits:
    """What one request may cost the server."""

    max_upload: int = MAX_UPLOAD  # bytes of a POST body (plus room for multipart framing); above: 413
    body_seconds: float = 30.0  # the whole body must arrive within this time (a byte-by-byte client): else 408
    workers: int = 4  # API requests processed at once; the rest queue (model work runs under one lock anyway)
    queue_seconds: float = 20.0  # a queued request not started within this time gets 503 (busy), not a hang
    queue_length: int = 256  # requests waiting beyond this many are refused at once with 503


class LimitUploads:
    """ASGI middleware guarding the API: POST bodies above the limit get 413 before the app parses or spools
    them (by Content-Length if sent, else by reading at most that much), bodies that do not arrive in time get
    408, and API requests beyond `workers` wait in a bounded queue for at most `queue_seconds` (then 503). A
    slow client therefore holds one connection, never a worker, and an overloaded server answers quickly."""

    def __init__(self, app, limit: int | Limits):
        self.app = app
        self.limits = limit if isinstance(limit, Limits) else Limits(max_upload=limit)
        self.limit = self.limits.max_upload
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            receive = await self._read_body(scope, receive, send)
            if receive is None:
                return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.workers)
        if self._waiting >= self.limits.queue_length:
            return await _json_response(send, 503, "the explorer is busy; try again shortly")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_seconds)
        except asyncio.TimeoutError:
            return await _json_response(send, 503, "the explorer is busy; try again shortly")
        finally:
            self._waiting -= 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self._slots.release()

    async def _read_body(self, scope, receive, send):
        """A `receive` that replays the whole body, or None once an error response was sent."""
        cap = self.limit + 64 * 1024
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await _json_response(send, 413, self.message())
            return None
        body, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.limits.body_seconds
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                await _json_response(send, 408, f"request body not received within {self.limits.body_seconds:g} s")
                return None
            if msg["type"] != "http.request":  # the client went away
                return None
            body.append(msg.get("body", b""))
            size += len(body[-1])
            more = msg.get("more_body", False)
            if size > cap:
                await _json_response(send, 413, self.message())
                return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        return replay

    def message(self) -> str:
        return too_large(self.limit)


def too_large(limit: int) -> str:
    return f"upload larger than the {limit:,} bytes ({limit / 2**20:.1f} MB) allowed"


async def _json_response(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SteerRequest(BaseModel):
    image_id: str
    latent: int
    scale: float
    patches: list[list[int]] | None = None  # [[row, col], ...]; None = every image token
    model: str = "base"


def create_app(explorer: Explorer | Blocks, max_upload: int = MAX_UPLOAD, limits: Limits | None = None):
    """The app over one Explorer, or over the blocks of a multi-layer run (every request uses the block the page
    last switched to)."""
    blocks = explorer if isinstance(explorer, Blocks) else Blocks.single(explorer)
    limits = limits or Limits(max_upload=max_upload)
    max_upload = limits.max_upload
    app = FastAPI(title="patchsae explorer", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(PatchSAEError)
    async def _bad_input(_req, exc):
        return error(400, str(exc))

    @app.exception_handler(NotAnImage)
    async def _not_image(_req, exc):
        return error(415, str(exc))

    @app.exception_handler(UnknownImage)
    async def _unknown_image(_req, exc):
        return error(404, f"unknown image id {exc.args[0]!r}: analyse the image again")

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc):
        return error(exc.status_code, f"not found: {req.url.path}" if exc.status_code == 404 else str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    def image_id(value: str) -> str:
        if not IMAGE_ID.match(value):
            raise UnknownImage(value)
        return value

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/info")
    def info():
        current = blocks.current
        return {**current.info(), **blocks.info(), "max_upload_bytes": max_upload,
                "figures": sorted(p.name for p in _figures(current))}

    @app.post("/api/layer/{layer}")
    def switch_layer(layer: int):
        """Show block `layer` of a multi-layer run from now on (uploads must be analysed again there)."""
        blocks.switch(layer)
        return info()

    @app.post("/api/analyze")
    async def analyze_upload(file: UploadFile = File(...)):
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:
            return error(413, too_large(max_upload))
        return blocks.current.analyze(blocks.current.add_upload(data, Path(file.filename or "upload").name))

    @app.post("/api/analyze/dataset/{index}")
    def analyze_dataset(index: int):
        return blocks.current.analyze(blocks.current.add_dataset(index))

    @app.get("/api/images/{image}/patch")
    def patch(image: str, row: int, col: int, n: int = 10):
        return blocks.current.patch(image_id(image), row, col, min(max(n, 1), 100))

    @app.get("/api/images/{image}/image.png")
    def image_png(image: str, latent: int | None = None, kind: str = "image", model: str = "base"):
        if kind != "image" and latent is None:
            raise PatchSAEError(f"kind={kind} needs a latent")
        return png(blocks.current.image_png(image_id(image), latent, kind, model))

    @app.get("/api/latents")
    def latents(q: str = "", limit: int = 50, show: str = "default"):
        """show: "default" (class-selective and other), "all" (every live kind) or kinds joined by commas."""
        shown = {"default": SHOWN_BY_DEFAULT, "all": KINDS[:-1]}.get(show) or [k for k in show.split(",") if k]
        return blocks.current.search(q[:200], min(max(limit, 1), 1000), shown)

    @app.get("/api/latents/{latent}")
    def latent(latent: int):
        return blocks.current.latent(latent)

    @app.get("/api/classes/{index}")
    def class_latents(index: int, n: int = 10, order: str = "specificity"):
        return blocks.current.class_latents(index, min(max(n, 1), 100), order)

    @app.post("/api/steer")
    def steer(req: SteerRequest):
        return blocks.current.steer(image_id(req.image_id), req.latent, req.scale, req.patches, req.model)

    @app.get("/api/figures/{name}")
    def figure(name: str):
        files = {p.name: p for p in _figures(blocks.current)}
        if name not in files:
            return error(404, f"no figure {name!r} in this run")
        return FileResponse(files[name], media_type="image/png")

    return LimitUploads(app, limits)


def _figures(explorer: Explorer) -> list[Path]:
    return listed_figures(explorer.run.figures_dir)


def check_listen(host: str, port: int) -> None:
    """Fail with one line, before the model work starts, if the address cannot be bound (port taken, bad host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except (OSError, OverflowError) as exc:
        raise PatchSAEError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None


def serve(explorer: Explorer | Blocks, host: str = "127.0.0.1", port: int = 7860, max_upload: int = MAX_UPLOAD) -> None:
    import uvicorn

    uvicorn.run(create_app(explorer, max_upload), host=host, port=port, log_level="warning")
