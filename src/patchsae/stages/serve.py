"""`patchsae serve`: explore the run's concepts in a browser (explorer/); reads the run, writes nothing into it."""

from __future__ import annotations

from dataclasses import dataclass

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.stages.setup import LayerChoice

NAME = "serve"
HELP = ("explore the run's concepts in a browser: top latents of an uploaded image and of each patch, heatmaps, "
        "statistics, reference images, steering")
RUN_HELP = "run directory with a trained SAE and `patchsae analyze` output"


@dataclass(frozen=True)
class ExplorerOptions:
    adapted: str | None = opt(None, "learnt MaPLe prompts: also show the adapted model, read by the same SAE "
                              "(latents common / base-only / adapted-only)", metavar="PROMPTS")


@dataclass(frozen=True)
class ServeOptions:
    port: int = opt(7860, "port")
    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only)", show_default=False)
    max_upload_mb: float = opt(10.0, "largest accepted upload in MB")


OPTIONS = (ExplorerOptions, ServeOptions, LayerChoice)


def open_explorer(run_path: str, adapted: str | None, layer: int | None = None):
    """The run opened for exploring; with `adapted`, the adapted model (MaPLe prompts) beside its CLIP."""
    from patchsae.runs import Run

    return _opener(adapted)(Run(run_path).at(layer))


def open_blocks(run_path: str, adapted: str | None, layer: int | None = None):
    """`open_explorer` at block `layer`, from which the page can switch to the run's other analysed blocks."""
    from patchsae.explorer.blocks import Blocks
    from patchsae.runs import Run

    return Blocks(Run(run_path), _opener(adapted), layer)


def _opener(adapted: str | None):
    """Run (at one block) -> Explorer, with the adapted model beside its CLIP when `adapted` names prompts."""
    from patchsae.explorer.session import Explorer

    adapt = None
    if adapted:
        from patchsae.models.maple import load_adapted

        adapt = lambda clip: load_adapted(clip, adapted)  # noqa: E731
    return lambda run: Explorer(run, adapt)


def cli(args) -> None:
    from patchsae.cli import given
    from patchsae.explorer.server import check_listen, serve

    o = ServeOptions(**given(args, ServeOptions))
    if o.max_upload_mb <= 0:
        raise PatchSAEError(f"--max-upload-mb must be positive, not {o.max_upload_mb}")
    check_listen(o.host, o.port)
    explorer = open_blocks(args.run, getattr(args, "adapted", None), getattr(args, "layer", None))
    host = f"[{o.host}]" if ":" in o.host else o.host
    print(f"patchsae explorer for {args.run} on http://{host}:{o.port}/  (Ctrl-C stops it)", flush=True)
    serve(explorer, o.host, o.port, int(o.max_upload_mb * 2**20))
