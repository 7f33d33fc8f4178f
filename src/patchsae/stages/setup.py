"""What cache, train and quickstart share: the run's config from a preset or the model's defaults plus the
options given on the command line, and the dry run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchsae.options import opt
from patchsae.runs import Run, RunConfig, start_config


@dataclass(frozen=True)
class ConfigOptions:
    """How a new run's config is started (its fields come from RunConfig, given as --model, --layer, ...)."""

    preset: str | None = opt(None, "start a new run from a named configuration (paper: ViT-B/16, block -2, all "
                             "tokens, ReLU x64 with the reference objective, lambda 8e-5, ImageNet-1k)", choices=("paper",))
    dry_run: bool = opt(False, "print the resolved configuration and its token, memory and step budget; writes "
                        "nothing and loads no model")


@dataclass(frozen=True)
class ExtractOptions:
    """How images reach the model when extracting (no effect on the results, so not part of the run's config)."""

    workers: int = opt(0, "processes that decode and preprocess images for the model (DataLoader workers, pinned "
                       "memory on CUDA); 0 decodes in the main process")


def overrides(args) -> dict:
    from patchsae.cli import given

    return given(args, RunConfig)


def dry_run(args) -> str:
    """The resolved config and its budget; writes nothing, loads no model and touches no network."""
    from patchsae.runs.presets import budget, format_dry_run

    run = Run(args.run)
    ov = overrides(args)
    cfg = run.load_config() if run.has_results() else replace(start_config(ov.get("model"), args_preset(args)),
                                                              **ov)
    return format_dry_run(cfg, budget(cfg))


def args_preset(args) -> str | None:
    return getattr(args, "preset", None)


def init_run(args):
    """Create or check the run's config; under torchrun (several ranks), rank 0 does it while the others wait.
    Returns (run, dist)."""
    from patchsae.dist import Dist

    run = Run(args.run)
    ov = overrides(args)
    device = ov.get("device") or (run.load_config().device if run.config_file.exists()
                                  else start_config(ov.get("model"), args_preset(args)).device)
    dist = Dist.from_env(device)
    if dist.is_main:
        run.init(start_config(ov.get("model"), args_preset(args)), ov)
    dist.barrier()
    return run, dist


def model_for(cfg: RunConfig, dist=None):
    """The run's model on its device (this process's GPU under torchrun)."""
    from patchsae.dist import Dist
    from patchsae.models.load import load_model

    return load_model(cfg.model, (dist or Dist()).device(cfg.device), act=cfg.act)


@dataclass(frozen=True)
class LayerChoice:
    """Which block of a multi-layer run a stage works on (`cache --layers`)."""

    layer: int | None = opt(None, "block of a multi-layer run to use, as given to --layers (default: the run's "
                            "first); a single-layer run takes only its own block", metavar="L")


def layer_run(args) -> Run:
    """The run at the block --layer chose (the run itself when it hooks one block)."""
    return Run(args.run).at(getattr(args, "layer", None))
