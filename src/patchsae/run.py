"""A run directory holds one whole experiment; every stage after the first takes only its path.

  DIR/config.json         the RunConfig (model, dataset, layer, token set, SAE and training settings)
  DIR/cache/<split>/      activation cache (see activations/cache.py for the format)
  DIR/sae/                model.safetensors, config.json, checkpoint.safetensors, train_log.csv
  DIR/eval/metrics.json   held-out metrics; DIR/figures/ figures; DIR/summary.json the headline numbers
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from patchsae import PatchSAEError
from patchsae.utils import read_json, write_json


@dataclass(frozen=True)
class RunConfig:
    model: str = "embedded"
    dataset: str = "fashion-mnist"
    dataset_path: str | None = None  # local copy of a registry dataset (save_to_disk or image folder)
    train_split: str = "train"
    eval_split: str = "test"
    layer: int = -2
    tokens: str = "all"  # all (CLS + patches), patch, cls
    max_train_images: int | None = None
    max_eval_images: int | None = None
    arch: str = "relu"
    expansion: int = 32
    k: int = 32
    l1_coeff: float = 8e-5
    l0_coeff: float = 1e-3
    lr: float = 4e-4
    warmup_steps: int = 500
    batch_tokens: int = 4096
    epochs: float = 1.0
    seed: int = 0
    device: str = "cpu"
    batch_images: int = 256

    def to_json(self) -> dict:
        return asdict(self)


# What the quickstart uses on the embedded model, chosen by the sweep recorded in the README
# (scripts/sweep_embedded.py): TopK reaches the targets there, ReLU + L1 (--arch relu, lambda 3e-2) just misses.
EMBEDDED_DEFAULTS = dict(arch="topk", k=24, expansion=16, l1_coeff=3e-2, lr=1e-3, batch_tokens=1024,
                         warmup_steps=100, epochs=1.0)


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    def cache_dir(self, split: str) -> Path:
        return self.path / "cache" / split

    @property
    def sae_dir(self) -> Path:
        return self.path / "sae"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

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
