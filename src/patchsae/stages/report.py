"""`patchsae report`: the explorer's content for the top latents and the classes as a static site."""

from __future__ import annotations

from dataclasses import dataclass

from patchsae import PatchSAEError
from patchsae.options import opt
from patchsae.stages.setup import LayerChoice
from patchsae.stages.serve import ExplorerOptions, open_explorer

NAME = "report"
HELP = ("write the explorer's content for the top latents and the classes as a static site (HTML + PNG + JSON, "
        "relative links)")
RUN_HELP = "run directory with a trained SAE and `patchsae analyze` output"


@dataclass(frozen=True)
class ReportOptions:
    out: str = opt(help="folder for the static site (created; files replaced)", required=True)
    top: int = opt(50, "latents with their own page, most interpretable first")
    class_top: int = opt(5, "each class's top latents by class-level count, which get pages too")


OPTIONS = (ExplorerOptions, ReportOptions, LayerChoice)


def cli(args) -> None:
    from patchsae.cli import given
    from patchsae.explorer.report import write_report

    o = ReportOptions(**given(args, ReportOptions))
    if o.top < 1 or o.class_top < 0:
        raise PatchSAEError(f"--top must be at least 1 and --class-top at least 0, not {o.top}, {o.class_top}")
    info = write_report(open_explorer(args.run, getattr(args, "adapted", None), getattr(args, "layer", None)), o.out, o.top, o.class_top)
    print(f"wrote {info['latent_pages']} latent pages, {info['class_pages']} class pages and "
          f"{info['images']} images to {o.out}; open {info['index']}")
