"""Test helpers shared by several modules (an in-memory token source and synthetic activations)."""

import torch


class MemTokens:
    """In-memory token source, deterministic per step. `fail_after` batches -> raise `error`;
    `nan_at_step` -> that step's batch holds a NaN."""

    def __init__(self, x_ND, fail_after=None, error=RuntimeError, nan_at_step=None):
        self.x = x_ND
        self.n_tokens = len(x_ND)
        self.fail_after = fail_after
        self.error = error
        self.nan_at_step = nan_at_step
        self.produced = 0

    def sample(self, n):
        return self.x[:n].clone()

    def batches(self, batch_size, start_step=0, rank=0, world=1):
        """Rank's part of each global batch (a distributed trainer's slice), like CachedTokens."""
        step = start_step
        while True:
            if self.fail_after is not None and self.produced >= self.fail_after:
                raise self.error("token source died")
            g = torch.Generator().manual_seed(1234 + step)
            b = self.x[torch.randint(0, self.n_tokens, (batch_size,), generator=g)].clone()
            if step == self.nan_at_step:
                b[3, 5] = float("nan")
            self.produced += 1
            yield b.tensor_split(world)[rank]
            step += 1


def _data(n=1024, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(40, d, generator=g)
    x = torch.relu(torch.randn(n, 40, generator=g) - 1.2) @ basis + 2.0
    return x + 0.05 * torch.randn(n, d, generator=g)


def reference_config_class(monkeypatch, d_in: int):
    """The reference implementation's config dataclass under its real import path (src.sae_training.config),
    so `torch.save` pickles it exactly as the reference's released checkpoint does."""
    import sys
    import types
    from dataclasses import dataclass

    mod = types.ModuleType("src.sae_training.config")

    @dataclass
    class ViTSAERunnerConfig:
        model_name: str = "openai/clip-vit-base-patch16"
        block_layer: int = -2
        class_token: bool = False
        d_in: int = 768
        expansion_factor: int = 64
        l1_coefficient: float = 8e-5
        dtype: torch.dtype = torch.float32
        device: torch.device = torch.device("cpu")

    ViTSAERunnerConfig.__module__, ViTSAERunnerConfig.__qualname__ = mod.__name__, "ViTSAERunnerConfig"
    mod.ViTSAERunnerConfig = ViTSAERunnerConfig
    for name in ("src", "src.sae_training", "src.sae_training.config"):
        monkeypatch.setitem(sys.modules, name, mod if name.endswith("config") else types.ModuleType(name))

    def make(**kw):
        return ViTSAERunnerConfig(**{"d_in": d_in, **kw})

    return make
