"""Runs: the run directory (`Run`, every artefact as a property), its config (`RunConfig`), presets, and one reader
per artefact (`runs.artefacts`) with one staleness rule."""

from patchsae.runs.config import EMBEDDED_DEFAULTS, RunConfig, start_config
from patchsae.runs.run import Run

__all__ = ["EMBEDDED_DEFAULTS", "Run", "RunConfig", "start_config"]
