"""`patchsae serve`: the explorer's JSON API and its page (static HTML/JS/CSS, no build step).

Every response body of /api is JSON or a PNG; every error is JSON {"error": "<one line>"} with a 4xx status.
The server reads no path the client sends: images are addressed by ids it handed out, figures by an exact
name from the run's figures folder, and static files come from the package's own folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchsae import PatchSAEError
from patchsae.analysis.kinds import KINDS, SHOWN_BY_DEFAULT
from patchsae.explorer.session import STATIC_DIR, Explorer, NotAnImage, UnknownImage

MAX_UPLOAD = 10 * 1024 * 1024
IMAGE_ID = re.compile(r"^(ds-[0-9]{1,9}|[0-9a-f]{16})$")


class LimitUploads:
    """ASGI middleware: refuse POST bodies above `limit` bytes (plus room for the multipart framing) with a 413
    before the app parses or spools them: by Content-Length if sent, else by reading at most that much."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        cap = self.limit + 64 * 1024
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await _json_response(send, 413, self.message())
        body, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return
            body.append(msg.get("body", b""))
            size += len(body[-1])
            more = msg.get("more_body", False)
            if size > cap:
                return await _json_response(send, 413, self.message())
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

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


def create_app(explorer: Explorer, max_upload: int = MAX_UPLOAD):
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
        return {**explorer.info(), "max_upload_bytes": max_upload,
                "figures": sorted(p.name for p in _figures(explorer))}

    @app.post("/api/analyze")
    async def analyze_upload(file: UploadFile = File(...)):
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:
            return error(413, too_large(max_upload))
        return explorer.analyze(explorer.add_upload(data, Path(file.filename or "upload").name))

    @app.post("/api/analyze/dataset/{index}")
    def analyze_dataset(index: int):
        return explorer.analyze(explorer.add_dataset(index))

    @app.get("/api/images/{image}/patch")
    def patch(image: str, row: int, col: int, n: int = 10):
        return explorer.patch(image_id(image), row, col, min(max(n, 1), 100))

    @app.get("/api/images/{image}/image.png")
    def image_png(image: str, latent: int | None = None, kind: str = "image", model: str = "base"):
        if kind != "image" and latent is None:
            raise PatchSAEError(f"kind={kind} needs a latent")
        return png(explorer.image_png(image_id(image), latent, kind, model))

    @app.get("/api/latents")
    def latents(q: str = "", limit: int = 50, show: str = "default"):
        """show: "default" (class-selective and other), "all" (every live kind) or kinds joined by commas."""
        shown = {"default": SHOWN_BY_DEFAULT, "all": KINDS[:-1]}.get(show) or [k for k in show.split(",") if k]
        return explorer.search(q[:200], min(max(limit, 1), 1000), shown)

    @app.get("/api/latents/{latent}")
    def latent(latent: int):
        return explorer.latent(latent)

    @app.get("/api/classes/{index}")
    def class_latents(index: int, n: int = 10, order: str = "specificity"):
        return explorer.class_latents(index, min(max(n, 1), 100), order)

    @app.post("/api/steer")
    def steer(req: SteerRequest):
        return explorer.steer(image_id(req.image_id), req.latent, req.scale, req.patches, req.model)

    @app.get("/api/figures/{name}")
    def figure(name: str):
        files = {p.name: p for p in _figures(explorer)}
        if name not in files:
            return error(404, f"no figure {name!r} in this run")
        return FileResponse(files[name], media_type="image/png")

    return LimitUploads(app, max_upload)


def _figures(explorer: Explorer) -> list[Path]:
    folder = explorer.run.figures_dir
    return [p for p in folder.iterdir() if p.suffix == ".png" and p.is_file()] if folder.is_dir() else []


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


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, max_upload: int = MAX_UPLOAD) -> None:
    import uvicorn

    uvicorn.run(create_app(explorer, max_upload), host=host, port=port, log_level="warning")
