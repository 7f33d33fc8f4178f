"""`patchsae probe`: fit the run's linear probe on the final image features of its training split and report its
accuracy on the training and held-out images (analysis/probe.py). Models without a text tower (DINOv2) classify
with it in `evaluate`, `classify` and the explorer, which fit it themselves when it is missing or stale; this stage
fits it up front (or again, --refit) and says how good it is. Writes DIR/probe.safetensors."""

from __future__ import annotations

from dataclasses import dataclass

from patchsae.options import opt
from patchsae.runs import Run

NAME = "probe"
HELP = ("fit the linear probe that models without a text tower (DINOv2) classify with, on the final features of the "
        "run's training split; report its train and held-out accuracy")
RUN_HELP = "run directory (its config names the model and the splits; no SAE needed)"


@dataclass(frozen=True)
class ProbeOptions:
    refit: bool = opt(False, "fit again even if the run's probe is current")


OPTIONS = (ProbeOptions,)


@dataclass(frozen=True)
class ProbeReport:
    model: str
    train_images: int
    train_accuracy: float
    eval_split: str
    eval_images: int
    eval_accuracy: float
    path: str
    used: bool  # whether the classification stages use it (False for a model with a text tower)


def run(run: Run, opts: ProbeOptions = ProbeOptions(), model=None, progress: bool = True) -> ProbeReport:
    from patchsae.analysis.probe import run_probe
    from patchsae.stages.setup import model_for

    model = model or model_for(run.load_config())
    m = run_probe(run, model, opts.refit, progress).meta
    return ProbeReport(model.name, m["train_images"], m["train_accuracy"], m["eval_split"], m["eval_images"],
                       m["eval_accuracy"], str(run.probe_file), not model.has_text)


def format_report(r: ProbeReport) -> str:
    note = "" if r.used else f" ({r.model} has a text tower: the classification stages use its zero-shot head)"
    return (f"linear probe on {r.model}: train accuracy {r.train_accuracy:.2%} ({r.train_images} images), "
            f"{r.eval_split} accuracy {r.eval_accuracy:.2%} ({r.eval_images} images){note}\nwrote {r.path}")


def cli(args) -> None:
    from patchsae.cli import given

    print(format_report(run(Run(args.run), ProbeOptions(**given(args, ProbeOptions)))))
