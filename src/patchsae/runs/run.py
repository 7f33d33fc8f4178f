"""A run directory holds one whole experiment; every stage after the first takes only its path. `Run` names every
artefact in it, so no other code builds a run path by hand:

  config.json                 the RunConfig                        cache/<split>/   activation cache
  sae/                        model.safetensors, config.json,      eval/metrics.json held-out metrics
                              checkpoint.safetensors, train_log.csv summary.json     the headline numbers
  analysis/                   stats.safetensors, latents.csv,      classify/        metrics.csv, manifest.json,
                              manifest.json                                         text_head.safetensors
  compare/<name>/             one adapted model vs CLIP            adapt-study/     the adaptation study
  figures/                    every figure                         report/          default static report
  paper/                      tables.md (`patchsae paper`)
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.runs.config import RunConfig
from patchsae.utils import read_json, write_json


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

    def compare_dir(self, name: str) -> Path:
        return self.path / "compare" / name

    @property
    def adapt_study_dir(self) -> Path:
        return self.path / "adapt-study"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def paper_dir(self) -> Path:
        """`patchsae paper`'s output: tables.md, the run's numbers beside the paper's."""
        return self.path / "paper"

    # ---- the config ----------------------------------------------------------------------------------------
    def has_results(self) -> bool:
        """Whether any stage has written into the run; until then its config may still be replaced
        (a rejected setting must not lock the directory)."""
        return any(p.name != "config.json" for p in self.path.iterdir()) if self.path.is_dir() else False

    def load_config(self) -> RunConfig:
        if not self.config_file.exists():
            raise PatchSAEError(f"{self.path} is not a run directory (no config.json); start with `patchsae cache`")
        try:
            data = read_json(self.config_file)
        except ValueError as exc:
            raise PatchSAEError(f"{self.config_file}: not valid JSON ({exc})") from None
        known = {f.name for f in fields(RunConfig)}
        unknown = set(data) - known
        if unknown:
            raise PatchSAEError(f"{self.config_file}: unknown settings {sorted(unknown)}")
        return RunConfig(**data)

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
