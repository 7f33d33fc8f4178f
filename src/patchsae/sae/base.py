"""What every SAE variant shares: the parameters, the input scale, encoding / decoding (dense and sparse),
the unit-norm decoder constraint, and the registry that makes `SAE(cfg)` build the type of `cfg.arch`.

A variant (relu.py, topk.py, jumprelu.py) supplies three things: `activate` (dense codes from
pre-activations), `_select` (which latents each token keeps, for the sparse paths) and `loss`; it is
registered under its (arch, objective) and may change the initialisation (`_initial_weights`).
Inputs are multiplied by `input_scale` (fixed at initialisation so that E||x||^2 = d_model on the first
sample) before encoding and divided after decoding: callers pass and get raw activations.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.sae.config import ARCHS, SAEConfig
from patchsae.sae.kernels import GatherPreActs, Workspaces
from patchsae.sae.losses import LOCAL, BatchStats

VARIANTS: dict[tuple[str, str], type[SAE]] = {}  # (arch, objective) -> its SAE subclass, filled by `register`


def register(arch: str, objective: str = "scaled"):
    """Class decorator: the SAE type built for `SAEConfig(arch=arch, objective=objective)`."""
    def deco(cls):
        VARIANTS[(arch, objective)] = cls
        cls.arch, cls.objective = arch, objective
        return cls
    return deco


def variant(cfg: SAEConfig) -> type[SAE]:
    """The SAE type of a configuration."""
    key = (cfg.arch, cfg.objective)
    if key not in VARIANTS:
        import patchsae.sae.model  # noqa: F401  (imports every variant module, which registers itself)
    if key not in VARIANTS:
        raise PatchSAEError(f"no SAE type for architecture {cfg.arch!r} with objective {cfg.objective!r} "
                            f"(architectures: {', '.join(ARCHS)})")
    return VARIANTS[key]


def geometric_median(points_ND: torch.Tensor, iters: int = 200, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the sum of Euclidean distances.

    The paper initialises b_dec with it because the mean is pulled by the heavy-tailed outlier tokens."""
    x = points_ND.double()
    m = x.mean(0)
    for _ in range(iters):
        d = (x - m).norm(dim=1).clamp_min(eps)
        w = 1.0 / d
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= 1e-10 * (1 + m.norm()):
            m = new
            break
        m = new
    return m.to(points_ND.dtype)


class SAE(nn.Module):
    """Base of the SAE variants. `SAE(cfg)` returns an instance of the variant registered for `cfg.arch`,
    so callers never name the subclasses; `isinstance(sae, SAE)` holds for every variant."""

    arch: str = ""  # set by `register`
    objective: str = ""

    def __new__(cls, cfg: SAEConfig | None = None, *args, **kwargs):
        if cls is SAE:
            if cfg is None:
                raise PatchSAEError("SAE(cfg) needs an SAEConfig")
            cls = variant(cfg)
        return super().__new__(cls)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if type(self) is not variant(cfg):
            raise PatchSAEError(f"{type(self).__name__} is the {type(self).arch!r} SAE with the "
                                f"{type(self).objective!r} objective, not {cfg.arch!r} with {cfg.objective!r}")
        self.cfg = cfg
        W_enc_DS, W_dec_SD = self._initial_weights(cfg)
        self.W_dec = nn.Parameter(W_dec_SD)  # (d_sae, d_model), unit rows
        self.W_enc = nn.Parameter(W_enc_DS)  # (d_model, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("input_scale", torch.ones(()))
        self._work = Workspaces()

    @staticmethod
    def _initial_weights(cfg: SAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc_DS, W_dec_SD): unit Kaiming-uniform decoder rows; the encoder starts as the decoder's
        transpose, scaled so the initial reconstruction has x's size rather than d_sae / d_model times it."""
        w = torch.empty(cfg.d_sae, cfg.d_model)
        nn.init.kaiming_uniform_(w)
        w = F.normalize(w, dim=1)
        return w.T.clone() * min(1.0, cfg.d_model / cfg.d_sae), w.clone()

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self._work.get(name, shape, dtype, device)

    # ---- what a variant defines -------------------------------------------------------------------------
    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        """Dense activations from pre-activations; inference=False is the training-time selection."""
        raise NotImplementedError

    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which latents each token keeps: (idx_NK, keep_NK), keep None when every pair is kept."""
        raise NotImplementedError

    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL, cls_N: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss on raw activations and its parts (mse, l0, fired_S, ...); all terms are means over
        tokens in the scaled space. `stats` reduces the batch-level statistics (see BatchStats). cls_N (tokens,)
        bool marks the rows that are CLS tokens; only the reference objective reads it (mse_cls_coefficient)."""
        raise NotImplementedError

    # ---- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, x_ND: torch.Tensor) -> None:
        """Fix the input scale and set b_dec to the geometric median of a first sample of activations."""
        x_ND = x_ND.float()
        self.input_scale.fill_((self.cfg.d_model / x_ND.pow(2).sum(1).mean()).sqrt().item())
        self.b_dec.copy_(geometric_median(x_ND * self.input_scale))

    # ---- dense forward -----------------------------------------------------------------------------------
    def centred(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND * self.input_scale - self.b_dec

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.centred(x_ND) @ self.W_enc + self.b_enc

    def encode(self, x_ND: torch.Tensor, inference: bool = True) -> torch.Tensor:
        """Latent activations f (…, d_sae) of raw activations x (…, d_model)."""
        return self.activate(self.pre_acts(x_ND), inference)

    def decode_scaled(self, f_NS: torch.Tensor) -> torch.Tensor:
        return f_NS @ self.W_dec + self.b_dec

    def decode(self, f_NS: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the raw activation space."""
        return self.decode_scaled(f_NS) / self.input_scale

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f_NS = self.encode(x_ND)
        return self.decode(f_NS), f_NS

    def raw_decoder_rows(self, latents: torch.Tensor | list[int] | int | None = None) -> torch.Tensor:
        """Decoder rows in raw activation units, W_dec / input_scale: the vector latent l adds to the raw
        residual stream per unit of activation. (d_sae, d_model), or the rows `latents` selects."""
        W_SD = self.W_dec if latents is None else self.W_dec[latents]
        return W_SD / self.input_scale

    # ---- sparse forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_acts_workspace(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(xc_ND, pre_NS): the centred, scaled input and the encoder's pre-activations, written into the reused
        "pre" workspace (no graph; valid until the next call)."""
        xc_ND = self.centred(x_ND)
        pre_NS = torch.addmm(self.b_enc, xc_ND, self.W_enc,
                             out=self._buffer("pre", (len(x_ND), self.cfg.d_sae), x_ND.dtype, x_ND.device))
        return xc_ND, pre_NS

    def _sparse_code(self, x_ND: torch.Tensor, inference: bool):
        """(vals_NK, idx_NK, xc_ND, pre_NS): values differentiable through the gathered columns only; pre_NS,
        the one dense product, carries no graph and is a reused workspace (valid until the next call); x gets
        no gradient."""
        xc_ND, pre_NS = self._pre_acts_workspace(x_ND)
        idx_NK, keep_NK = self._select(pre_NS, inference)
        vals_NK = F.relu(GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, idx_NK))
        if keep_NK is not None:
            vals_NK = vals_NK * keep_NK
        return vals_NK, idx_NK, xc_ND, pre_NS

    def encode_sparse(self, x_ND: torch.Tensor, inference: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(values_NK, indices_NK) of the active latents of x (N, d_model); rows with fewer than K active
        latents are padded with value 0. JumpReLU values carry no threshold gradient here (train densely)."""
        vals_NK, idx_NK, _, _ = self._sparse_code(x_ND, inference)
        return vals_NK, idx_NK

    def decode_sparse_scaled(self, vals_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx_NK, self.W_dec, per_sample_weights=vals_NK, mode="sum") + self.b_dec

    def decode_sparse(self, vals_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the raw space from (values, indices): a weighted sum of k decoder rows a token."""
        return self.decode_sparse_scaled(vals_NK, idx_NK) / self.input_scale

    # ---- decoder constraint ----------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out of each decoder row's gradient its component along that (unit) row, so the step
        moves along the sphere and renormalising afterwards undoes only second-order drift."""
        if self.W_dec.grad is None:
            return
        parallel_S = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel_S * self.W_dec)
