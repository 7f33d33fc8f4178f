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
  paper/                      tables.md (`patchsae paper`)

A run of several blocks (`cache --layers`) adds layers.json (the hooked blocks, resolved) and keeps every
per-layer artefact of block L under a `layer<L>` folder: cache/<split>/layer<L>/, sae/layer<L>/,
eval/layer<L>/metrics.json, analysis/layer<L>/, classify/layer<L>/, figures/layer<L>/, compare/<name>/layer<L>/,
adapt-study/layer<L>/, report/layer<L>/. `Run.at(layer)` is the run seen at one block: its artefact paths are
that block's, and its config hooks that block alone, so every stage runs on it unchanged. A single-layer run
keeps the layout above; `at` returns it as it is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.runs.config import RunConfig
from patchsae.utils import dataclass_from_json, read_json, read_json_file, write_json


class Run:
    def __init__(self, path: str | Path, layer: int | None = None):
        self.path = Path(path)
        self.layer = layer  # the block this view is bound to in a multi-layer run (None: single-layer run)

    def _per_layer(self, folder: Path) -> Path:
        return folder if self.layer is None else folder / f"layer{self.layer}"

    # ---- artefacts ---------------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    def cache_dir(self, split: str) -> Path:
        return self._per_layer(self.path / "cache" / split)

    @property
    def sae_dir(self) -> Path:
        return self._per_layer(self.path / "sae")

    @property
    def sae_weights(self) -> Path:
        return self.sae_dir / "model.safetensors"

    @property
    def eval_metrics_file(self) -> Path:
        return self._per_layer(self.path / "eval") / "metrics.json"

    @property
    def eval_layers_file(self) -> Path:
        """Multi-layer runs: `evaluate`'s table over the blocks (markdown)."""
        return self.path / "eval" / "layers.md"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def figures_dir(self) -> Path:
        return self._per_layer(self.path / "figures")

    @property
    def analysis_dir(self) -> Path:
        return self._per_layer(self.path / "analysis")

    @property
    def classify_dir(self) -> Path:
        return self._per_layer(self.path / "classify")

    @property
    def text_head_file(self) -> Path:
        """The zero-shot head of the run's model over the analysed classes (a cache keyed by its inputs)."""
        return self.path / "classify" / "text_head.safetensors"  # the same for every layer

    @property
    def probe_file(self) -> Path:
        """The linear probe on the final image features, for models without a text tower (analysis/probe.py)."""
        return self.path / "probe.safetensors"

    def compare_dir(self, name: str) -> Path:
        return self._per_layer(self.path / "compare" / name)

    @property
    def adapt_study_dir(self) -> Path:
        return self._per_layer(self.path / "adapt-study")

    @property
    def report_dir(self) -> Path:
        return self._per_layer(self.path / "report")

    @property
    def layers_file(self) -> Path:
        """Multi-layer runs only: {"n_blocks": N, "layers": [hooked blocks, resolved]}, written by `cache`."""
        return self.path / "layers.json"

    # ---- layers -------------------------------------------------------------------------------------------
    def hooked_layers(self) -> list[int] | None:
        """The blocks of a multi-layer run, in the order given (the first is the default); None for a
        single-layer run."""
        return read_json(self.layers_file)["layers"] if self.layers_file.exists() else None

    def layer_runs(self) -> list[Run]:
        """The run at each of its blocks ([self] for a single-layer run)."""
        layers = self.hooked_layers()
        return [self] if layers is None else [Run(self.path, layer) for layer in layers]

    def at(self, layer: int | None) -> Run:
        """The run at block `layer` (a block index as given to --layer, negative from the end; None: the run's
        first), or one line saying which blocks the run has."""
        if not self.layers_file.exists():
            if self.config_file.exists() and self.has_results() and self.load_config().layers is not None:
                raise PatchSAEError(f"{self.path} hooks several blocks but has no {self.layers_file.name}; "
                                    f"run `patchsae cache --run {self.path}` first")
            if layer is not None and layer not in self._single_layer_names():
                raise PatchSAEError(f"{self.path} hooks only block {self.load_config().layer}; --layer {layer} needs "
                                    "a run cached with --layers")
            return self
        index = read_json(self.layers_file)
        n, layers = index["n_blocks"], index["layers"]
        if layer is None:
            return Run(self.path, layers[0])
        if not -n <= layer < n or layer % n not in layers:
            raise PatchSAEError(f"block {layer} is not one of this run's blocks {layers} ({self.path}); "
                                "choose one with --layer")
        return Run(self.path, layer % n)

    def _single_layer_names(self) -> set[int]:
        """The names a single-layer run's block goes by: the config's --layer and the block its cache records."""
        cfg = self.load_config()
        names = {cfg.layer}
        manifest = self.cache_dir(cfg.train_split) / "manifest.json"
        if manifest.exists():
            names.add(read_json(manifest).get("layer"))
        return names

    @property
    def logs_dir(self) -> Path:
        """Experiment-tracker output (tensorboard event files, offline wandb runs)."""
        return self.path / "logs"

    @property
    def tracker_file(self) -> Path:
        """Which tracker `train --log` used, so `evaluate` adds its metrics to the same logs."""
        return self.logs_dir / "tracker.json"

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
        data = read_json_file(self.config_file, "run config")
        cfg = dataclass_from_json(RunConfig, data, str(self.config_file))
        return cfg if self.layer is None else replace(cfg, layer=self.layer, layers=None)

    def init(self, cfg: RunConfig, overrides: dict) -> RunConfig:
        """Create the run's config, or check that explicit overrides agree with the one it has."""
        if self.config_file.exists() and self.has_results():
            current = self.load_config()
            asked = replace(current, **overrides)  # normalised as the config normalises them
            clash = {k: (getattr(current, k), v) for k, v in overrides.items()
                     if getattr(current, k) != getattr(asked, k)}
            if clash:
                desc = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in clash.items())
                raise PatchSAEError(f"{self.path} was created with {desc}; use a new run directory")
            return current
        cfg = replace(cfg, **overrides)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, cfg.to_json())
        return cfg
