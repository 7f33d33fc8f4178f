"""A run directory holds one whole experiment; every stage after the first takes only its path. `Run` names every
artefact in it, so no other code builds a run path by hand:

  config.json                 the RunConfig                        cache/<split>/   activation cache
  sae/                        model.safetensors, config.json,      eval/metrics.json held-out metrics
                              checkpoint.safetensors, train_log.csv summary.json     the headline numbers
  analysis/                   stats.safetensors, latents.csv,      classify/        metrics.csv, manifest.json,
                              manifest.json                                         text_head.safetensors
  compare/<name>/             one adapted model vs CLIP            adapt-study/     the adaptation study
  figures/                    every figure                         report/          default static report
  logs/                       tracker output of `train --log`, tracker.json
  probe.safetensors           the linear probe of a model without a text tower (DINOv2), with its accuracies
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.runs.config import RunConfig
from patchsae.utils import dataclass_from_json, read_json_file, write_json


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ---- artefacts ---------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    def cache_dir(self, split: str) -> Path:
        return self.path / "cache" / split

    @property
    def sae_dir(self) -> Path:
        return self.path / "sae"

    @property
    def sae_weights(self) -> Path:
        return self.sae_dir / "model.safetensors"

    @property
    def eval_metrics_file(self) -> Path:
        return self.path / "eval" / "metrics.json"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def analysis_dir(self) -> Path:
        return self.path / "analysis"

    @property
    def classify_dir(self) -> Path:
        return self.path / "classify"

    @property
    def text_head_file(self) -> Path:
        """The zero-shot head of the run's model over the analysed classes (a cache keyed by its inputs)."""
        return self.classify_dir / "text_head.safetensors"

    @property
    def probe_file(self) -> Path:
        """The linear probe on the final image features, for models without a text tower (analysis/probe.py)."""
        return self.path / "probe.safetensors"

    def compare_dir(self, name: str) -> Path:
        return self.path / "compare" / name

    @property
    def adapt_study_dir(self) -> Path:
        return self.path / "adapt-study"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def logs_dir(self) -> Path:
        """Experiment-tracker output (tensorboard event files, offline wandb runs)."""
        return self.path / "logs"

    @property
    def tracker_file(self) -> Path:
        """Which tracker `train --log` used, so `evaluate` adds its metrics to the same logs."""
        return self.logs_dir / "tracker.json"

    # ---- the config ----------------------------------------------------------------------------------------
    def has_results(self) -> bool:
        """Whether any stage has written into the run; until then its config may still be replaced
        (a rejected setting must not lock the directory)."""
        return any(p.name != "config.json" for p in self.path.iterdir()) if self.path.is_dir() else False

    def load_config(self) -> RunConfig:
        if not self.config_file.exists():
            raise PatchSAEError(f"{self.path} is not a run directory (no config.json); start with `patchsae cache`")
        data = read_json_file(self.config_file, "run config")
        return dataclass_from_json(RunConfig, data, str(self.config_file))

    def init(self, cfg: RunConfig, overrides: dict) -> RunConfig:
        """Create the run's config, or check that explicit overrides agree with the one it has."""
        if self.config_file.exists() and self.has_results():
            current = self.load_config()
            clash = {k: (getattr(current, k), v) for k, v in overrides.items() if getattr(current, k) != v}
            if clash:
                desc = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in clash.items())
                raise PatchSAEError(f"{self.path} was created with {desc}; use a new run directory")
            return current
        cfg = replace(cfg, **overrides)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, cfg.to_json())
        return cfg
