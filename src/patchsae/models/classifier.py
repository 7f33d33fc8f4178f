"""What the classification stages classify image features with: the model's own zero-shot text head where it has
a text tower (CLIP, SigLIP), else a linear probe fitted on the run's training split (DINOv2).

Both answer the same two questions, so `evaluate`, `classify` and the explorer never ask which one they hold:
`logits(features_BE)` (argmax = the prediction) and `probs(features_BE)` (what the explorer shows).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.models.backbone import Backbone
from patchsae.utils import atomic_path

PROBE_L2 = 1e-3  # L2 penalty on the standardised-feature weights (the bias is not penalised)
PROBE_MAX_ITER = 500  # L-BFGS iterations (full batch)


class Classifier(ABC):
    kind: str  # "zero-shot" or "probe": what evaluate/classify report their accuracies with

    @abstractmethod
    def logits(self, features_BE: torch.Tensor) -> torch.Tensor:
        """(batch, classes); argmax is the prediction."""

    @abstractmethod
    def probs(self, features_BE: torch.Tensor) -> torch.Tensor:
        """Class probabilities (batch, classes) as shown to a user."""


class TextClassifier(Classifier):
    """The model's zero-shot head: cosine similarity to each class's prompt ensemble (`Backbone.text_head`)."""

    kind = "zero-shot"

    def __init__(self, model: Backbone, head_CE: torch.Tensor):
        self.model, self.head_CE = model, head_CE

    def logits(self, features_BE: torch.Tensor) -> torch.Tensor:
        return self.model.logits(features_BE, self.head_CE)

    def probs(self, features_BE: torch.Tensor) -> torch.Tensor:
        return self.model.zero_shot_probs(features_BE, self.head_CE)


def as_classifier(model: Backbone, head: Classifier | torch.Tensor) -> Classifier:
    """A Classifier as is; a text head tensor (classes, E) wrapped as the model's zero-shot classifier."""
    return head if isinstance(head, Classifier) else TextClassifier(model, head)


class LinearProbe(Classifier):
    """Multinomial logistic regression on standardised features: logits = ((x - mean_E) / std_E) @ W_CE.T + b_C.
    Kept in float64, as fitted, so the predictions stored runs make are reproduced exactly."""

    kind = "probe"

    def __init__(self, W_CE: torch.Tensor, b_C: torch.Tensor, mean_E: torch.Tensor, std_E: torch.Tensor,
                 meta: dict | None = None):
        self.W_CE, self.b_C, self.mean_E, self.std_E = (t.double() for t in (W_CE, b_C, mean_E, std_E))
        self.meta = meta or {}  # what it was fitted on and its accuracies (written with it)

    def logits(self, features_BE: torch.Tensor) -> torch.Tensor:
        dev = features_BE.device
        z_BE = (features_BE.double() - self.mean_E.to(dev)) / self.std_E.to(dev)
        return (z_BE @ self.W_CE.to(dev).T + self.b_C.to(dev)).float()

    def probs(self, features_BE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(features_BE), -1)

    @classmethod
    def fit(cls, x_NE: torch.Tensor, y_N: torch.Tensor, n_classes: int, l2: float = PROBE_L2,
            max_iter: int = PROBE_MAX_ITER) -> "LinearProbe":
        """Minimise mean cross-entropy + l2/2 |W|^2 on standardised features by full-batch L-BFGS from zero, in
        float64: convex, so the optimum does not depend on the start, and the same inputs give the same probe
        bit for bit (no sampling; nothing to seed). A constant feature gets std 1 instead of 0."""
        if len(x_NE) == 0:
            raise PatchSAEError("no training images to fit the linear probe on")
        x_NE = x_NE.detach().double().cpu()
        y_N = y_N.long().cpu()
        mean_E = x_NE.mean(0)
        std_E = x_NE.std(0, unbiased=False)
        std_E = torch.where(std_E > 1e-12, std_E, torch.ones_like(std_E))
        z_NE = (x_NE - mean_E) / std_E
        W_CE = torch.zeros(n_classes, x_NE.shape[1], dtype=torch.float64, requires_grad=True)
        b_C = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W_CE, b_C], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-10,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = F.cross_entropy(z_NE @ W_CE.T + b_C, y_N) + 0.5 * l2 * (W_CE ** 2).sum()
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(loss)
        return cls(W_CE.detach(), b_C.detach(), mean_E, std_E, {"l2": l2, "max_iter": max_iter})

    # ---- on disk --------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"W_CE": self.W_CE, "b_C": self.b_C, "mean_E": self.mean_E, "std_E": self.std_E}
        with atomic_path(Path(path)) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe | None":
        """The probe at `path`, or None if there is none or it cannot be read (it is refitted, never trusted)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
                return cls(*(f.get_tensor(k) for k in ("W_CE", "b_C", "mean_E", "std_E")), meta)
        except Exception:  # noqa: BLE001 - missing or unreadable: the caller refits
            return None


def check_classes(probe: LinearProbe, class_names: Sequence[str], where: str) -> None:
    """A probe classifies only the classes it was fitted on."""
    fitted = probe.meta.get("class_names")
    if fitted is not None and list(fitted) != list(class_names):
        raise PatchSAEError(f"the linear probe in {where} was fitted on the classes {fitted[:5]}...; it cannot "
                            f"classify {list(class_names)[:5]}... (a model without a text tower classifies only "
                            "its run's own dataset)")
