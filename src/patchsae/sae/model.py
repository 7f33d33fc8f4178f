"""Sparse autoencoders as pure tensor modules: they know nothing of CLIP or images.

ReLU SAE (the paper's):  f = ReLU((x - b_dec) W_enc + b_enc),  x_hat = f W_dec + b_dec
TopK SAE:                f = TopK_k(ReLU((x - b_dec) W_enc + b_enc)), same decoder.
BatchTopK SAE:           the batch's top (tokens x k) of ReLU(pre) in training; afterwards a JumpReLU with one
                         threshold, a running estimate of the smallest activation the batch selection kept.
JumpReLU SAE:            f = pre * H(pre - theta_S), per-latent thresholds trained with straight-through
                         estimators and an L0 penalty.
TopK-family training decodes from the k active (index, value) pairs only, so the (tokens x d_sae) matrix is
built once, by the encoder's forward product, and never enters a backward pass.
Decoder rows are kept at unit L2 norm, so a latent's activation is its contribution's length.
Inputs are multiplied by `input_scale` (fixed at initialisation so that E||x||^2 = d_model on the first
sample) before encoding and divided after decoding: callers pass and get raw activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae import PatchSAEError


ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
TOPK_FAMILY = ("topk", "batchtopk")
RELU_SPARSE_DENSITY = 0.02  # ReLU training runs sparse while at most this fraction of (token, latent) pairs fire
THRESHOLD_EMA = 0.01  # BatchTopK: weight of each batch's smallest kept activation in the running threshold


@dataclass(frozen=True)
class SAEConfig:
    d_model: int
    d_sae: int
    arch: str = "relu"  # one of ARCHS: "relu" (L1 penalty), "topk", "batchtopk", "jumprelu" (L0 penalty)
    k: int = 32  # active latents per token, TopK; mean active latents per token, BatchTopK
    l1_coeff: float = 8e-5  # lambda, ReLU only
    ghost_grads: bool = True  # ReLU only; the TopK family uses the AuxK loss
    aux_k: int = 0  # TopK-family auxiliary latents; 0 = d_model // 2
    aux_coeff: float = 1 / 32
    dead_steps: int = 64  # a latent is dead after this many steps without firing
    l0_coeff: float = 1e-3  # JumpReLU only: weight of the L0 penalty
    bandwidth: float = 1e-3  # JumpReLU only: width of the straight-through rectangle kernel
    init_threshold: float = 1e-3  # JumpReLU only: initial theta of every latent

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise PatchSAEError(f"unknown SAE architecture {self.arch!r} (choose {', '.join(ARCHS)})")
        if self.arch in TOPK_FAMILY and not 0 < self.k <= self.d_sae:
            raise PatchSAEError(f"{self.arch} k={self.k} must be in 1..d_sae={self.d_sae}")
        if self.arch == "jumprelu" and not (self.bandwidth > 0 and self.init_threshold > 0 and self.l0_coeff >= 0):
            raise PatchSAEError("jumprelu needs bandwidth > 0, init_threshold > 0 and l0_coeff >= 0")

    def to_json(self) -> dict:
        return asdict(self)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class BatchStats:
    """How the few batch-level statistics of a loss (AuxK's residual variance, the ghost-grad scale,
    BatchTopK's smallest kept activation) are reduced. One process: the identity. A distributed trainer passes
    functions that turn a rank's mean over its tokens into the mean over the global batch, and a rank's minimum
    into the global one, so every rank computes the loss of the same global batch."""

    mean: Callable[[torch.Tensor], torch.Tensor] = _same
    min: Callable[[torch.Tensor], torch.Tensor] = _same


LOCAL = BatchStats()


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


class _GatherPreActs(torch.autograd.Function):
    """vals_NK = pre_NS[n, idx_NK] where pre_NS = (x_ND - b_dec) @ W_enc + b_enc (x already scaled) was
    computed without a graph.

    The backward touches only the gathered (token, latent) pairs, as sparse products, instead of the dense
    (tokens x d_sae) gradient autograd would build through pre_NS. x is data and gets no gradient, so b_dec's
    gradient through the encoder is -W_enc (sum of the gathered gradients per latent): a GEMV, not the
    (tokens x d_model) sparse product a gradient for x would need."""

    @staticmethod
    def forward(ctx, xc_ND, W_enc, b_enc, b_dec, pre_NS, idx_NK, rows=None):
        """idx_NK (tokens, k) latents per token; or, with `rows`, flat (row, latent) pairs rows[i], idx_NK[i]."""
        ctx.save_for_backward(xc_ND, W_enc, idx_NK, rows)
        return pre_NS.gather(-1, idx_NK) if rows is None else pre_NS[rows, idx_NK]

    @staticmethod
    def backward(ctx, g_NK):
        xc_ND, W_enc, idx_NK, rows = ctx.saved_tensors
        n, s = len(xc_ND), W_enc.shape[1]
        if rows is None:
            rows = torch.arange(n, device=idx_NK.device).repeat_interleave(idx_NK.shape[1])
        cols, g = idx_NK.reshape(-1), g_NK.reshape(-1)
        g_NS = torch.sparse_coo_tensor(torch.stack([rows, cols]), g, (n, s), check_invariants=False)
        gW = torch.sparse.mm(g_NS.t(), xc_ND).t() if ctx.needs_input_grad[1] else None
        gb = torch.zeros(s, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        gb_dec = -(W_enc @ gb) if ctx.needs_input_grad[3] else None
        return None, gW, gb if ctx.needs_input_grad[2] else None, gb_dec, None, None, None


class _ReLUObjective(torch.autograd.Function):
    """The ReLU SAE's MSE + lambda * L1 with a hand-written backward, returning (loss, mse, l1, f_NS, err_ND).

    Autograd would build six (tokens x d_sae) temporaries and six GEMMs of that size; this keeps two
    temporaries (f, and its gradient, both updated in place) and five GEMMs: b_dec's gradient through the
    encoder is -(sum_n g_pre[n]) W_enc^T, a GEMV, where autograd forms the whole (tokens x d_model) product."""

    @staticmethod
    def forward(ctx, xs_ND, W_enc, b_enc, W_dec, b_dec, l1_coeff, pre_NS, g_out, mask_out):
        """pre_NS = (xs - b_dec) W_enc + b_enc, computed by the caller without a graph; it becomes f in place."""
        xc_ND = xs_ND - b_dec
        f_NS = pre_NS.relu_()
        err_ND = torch.addmm(b_dec, f_NS, W_dec).sub_(xs_ND)
        n = len(xs_ND)
        mse, l1 = err_ND.pow(2).mean(), f_NS.sum() / n  # f >= 0: the L1 norm is the sum
        ctx.save_for_backward(xc_ND, f_NS, err_ND, W_enc, W_dec)
        ctx.l1_coeff, ctx.g_out, ctx.mask_out = l1_coeff, g_out, mask_out
        ctx.mark_non_differentiable(f_NS, err_ND)
        return mse + l1_coeff * l1, mse, l1, f_NS, err_ND

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l1, _g_f, _g_err):
        xc_ND, f_NS, err_ND, W_enc, W_dec = ctx.saved_tensors
        n, d = err_ND.shape
        g_err_ND = err_ND * ((g_loss + g_mse) * (2.0 / (n * d)))
        g_NS = torch.mm(g_err_ND, W_dec.t(), out=ctx.g_out).add_((g_loss * ctx.l1_coeff + g_l1) / n)
        g_NS.masked_fill_(torch.le(f_NS, 0, out=ctx.mask_out), 0.0)  # through the ReLU, in place
        gb_enc = g_NS.sum(0)
        gx = g_err_ND - g_NS @ W_enc.t() if ctx.needs_input_grad[0] else None
        return (gx, torch.mm(xc_ND.t(), g_NS), gb_enc, torch.mm(f_NS.t(), g_err_ND),
                g_err_ND.sum(0) - W_enc @ gb_enc, None, None, None, None)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); theta's gradient is the straight-through estimate -(theta/eps) K((pre-theta)/eps),
    non-zero only for pre-activations within eps/2 of the threshold (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre_NS, theta_S, eps):
        ctx.save_for_backward(pre_NS, theta_S)
        ctx.eps = eps
        return pre_NS * (pre_NS > theta_S)

    @staticmethod
    def backward(ctx, g_NS):
        pre_NS, theta_S = ctx.saved_tensors
        g_pre = g_NS * (pre_NS > theta_S)
        g_theta = -(theta_S / ctx.eps) * _rectangle((pre_NS - theta_S) / ctx.eps) * g_NS
        return g_pre, g_theta.reshape(-1, theta_S.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty: no gradient to pre, the STE -(1/eps) K((pre-theta)/eps) to theta."""

    @staticmethod
    def forward(ctx, pre_NS, theta_S, eps):
        ctx.save_for_backward(pre_NS, theta_S)
        ctx.eps = eps
        return (pre_NS > theta_S).to(pre_NS.dtype)

    @staticmethod
    def backward(ctx, g_NS):
        pre_NS, theta_S = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _rectangle((pre_NS - theta_S) / ctx.eps) * g_NS
        return None, g_theta.reshape(-1, theta_S.shape[-1]).sum(0), None


def _mask_to_pairs(f_NS: torch.Tensor, keep_NS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_NK, keep_NK) for the kept entries of each row, padded to the longest row (at least one column);
    padding has keep False."""
    k = max(1, int(keep_NS.sum(-1).max())) if keep_NS.numel() else 1
    idx_NK = f_NS.masked_fill(~keep_NS, -torch.inf).topk(k, dim=-1, sorted=False).indices
    return idx_NK, keep_NS.gather(-1, idx_NK)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        w = torch.empty(cfg.d_sae, cfg.d_model)
        nn.init.kaiming_uniform_(w)
        w = F.normalize(w, dim=1)
        self.W_dec = nn.Parameter(w.clone())  # (d_sae, d_model), unit rows
        # encoder starts as the decoder's transpose, scaled so the initial reconstruction has x's size
        # rather than d_sae / d_model times it
        self.W_enc = nn.Parameter(w.T.clone() * min(1.0, cfg.d_model / cfg.d_sae))  # (d_model, d_sae)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("input_scale", torch.ones(()))
        self._buffers_: dict[str, torch.Tensor] = {}  # workspaces, see _buffer (not state)
        # only the architectures that use them get these, so older relu/topk files keep loading
        if cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))  # 0 = no batch seen yet
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

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

    def activate(self, pre_NS: torch.Tensor, inference: bool = True) -> torch.Tensor:
        """Dense activations. BatchTopK selects across the batch only with inference=False (training); by
        default it is the JumpReLU with the learnt threshold, so a token's code does not depend on its batch."""
        arch = self.cfg.arch
        if arch == "jumprelu":
            return _JumpReLU.apply(pre_NS, self.log_threshold.exp(), self.cfg.bandwidth)
        f_NS = F.relu(pre_NS)
        if arch == "topk":
            vals, idx = f_NS.topk(self.cfg.k, dim=-1, sorted=False)
            f_NS = torch.zeros_like(f_NS).scatter_(-1, idx, vals)
        elif arch == "batchtopk" and inference:
            f_NS = f_NS * (pre_NS > self.threshold)
        elif arch == "batchtopk":
            f_NS = f_NS * self._batch_keep(f_NS.detach())
        return f_NS

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

    # ---- sparse forward ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch_keep(self, f_NS: torch.Tensor) -> torch.Tensor:
        """BatchTopK mask: the batch's (tokens x k) largest activations, wherever they fall."""
        flat = f_NS.reshape(-1)
        idx = flat.topk(min(self.cfg.k * (flat.numel() // self.cfg.d_sae), flat.numel()), sorted=False).indices
        return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx, True).view_as(f_NS)

    @torch.no_grad()
    def _select(self, pre_NS: torch.Tensor, inference: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which latents each token keeps: (idx_NK, keep_NK), keep None when every pair is kept."""
        arch = self.cfg.arch
        if arch == "topk":  # ReLU is monotone: the k largest pre-activations are the k largest ReLU(pre)
            return pre_NS.topk(self.cfg.k, dim=-1, sorted=False).indices, None
        f_NS = F.relu(pre_NS)
        if arch == "batchtopk" and not inference:
            return _mask_to_pairs(f_NS, self._batch_keep(f_NS))
        theta = {"relu": 0.0, "batchtopk": self.threshold}.get(arch)
        return _mask_to_pairs(f_NS, pre_NS > (self.log_threshold.exp() if theta is None else theta))

    def _buffer(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A (tokens x d_sae) workspace reused from step to step: on CPU a fresh 800 MB tensor (4,096 x 49,152)
        costs more in page faults than its copy. Its contents live until the next call that asks for it."""
        buf = self._buffers_.get(name)
        if buf is None or buf.shape != shape or buf.device != device or buf.dtype != dtype:
            buf = self._buffers_[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf

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
        vals_NK = F.relu(_GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, idx_NK))
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

    # ---- losses ---------------------------------------------------------------------------------------------
    def loss(self, x_ND: torch.Tensor, dead_S: torch.Tensor | None = None,
             stats: BatchStats = LOCAL) -> tuple[torch.Tensor, dict]:
        """Training loss on raw activations; all terms are means over tokens in the scaled space. The TopK
        family runs sparse and, in training mode, BatchTopK moves its threshold estimate. `stats` reduces the
        batch-level statistics (see BatchStats); BatchTopK's selection itself stays within x_ND."""
        if self.cfg.arch in TOPK_FAMILY:
            return self._sparse_loss(x_ND, dead_S, stats)
        if self.cfg.arch == "relu":
            return self._relu_loss(x_ND, dead_S, stats)
        xs_ND = x_ND * self.input_scale
        pre_NS = self.pre_acts(x_ND)
        f_NS = self.activate(pre_NS)
        err_ND = self.decode_scaled(f_NS) - xs_ND
        mse = err_ND.pow(2).mean()
        on_NS = f_NS.detach() > 0
        parts = {"mse": mse.detach(), "l0": on_NS.float().sum(-1).mean(), "fired_S": on_NS.any(0)}
        l0 = _Step.apply(pre_NS, self.log_threshold.exp(), self.cfg.bandwidth).sum(-1).mean()
        loss = mse + self.cfg.l0_coeff * l0
        return loss, parts

    def _relu_loss(self, x_ND, dead_S, stats):
        """Sparse while few latents fire (a trained ReLU SAE: the paper's L0 of 149 is 0.3 % of 49,152), else
        the dense objective; both compute the same loss and gradients."""
        xc_ND, pre_NS = self._pre_acts_workspace(x_ND)
        with torch.no_grad():
            on_NS = torch.gt(pre_NS, 0, out=self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device))
            nnz = int(torch.count_nonzero(on_NS))
        if nnz <= RELU_SPARSE_DENSITY * on_NS.numel():
            loss, parts, err_ND, mse = self._relu_sparse_loss(x_ND, xc_ND, pre_NS, on_NS)
        else:
            loss, parts, err_ND, mse = self._relu_dense_loss(x_ND, pre_NS)
        if self.cfg.ghost_grads and dead_S is not None and dead_S.any():
            ghost = self._ghost_loss(x_ND, err_ND, mse, dead_S, stats)
            loss = loss + ghost
            parts["ghost"] = ghost.detach()
        return loss, parts

    def _relu_sparse_loss(self, x_ND, xc_ND, pre_NS, on_NS):
        """(loss, parts, err_ND, mse) of ReLU + L1 from the (token, latent) pairs with pre > 0: encoder gradient
        through the gathered pairs, decoder as embedding bags of variable size."""
        n = len(x_ND)
        with torch.no_grad():
            rows, cols = on_NS.nonzero(as_tuple=True)  # row-major: rows sorted
            offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
        vals = _GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, cols, rows)
        x_hat = F.embedding_bag(cols, self.W_dec, offsets, per_sample_weights=vals, mode="sum") + self.b_dec
        err_ND = x_hat - x_ND * self.input_scale
        mse, l1 = err_ND.pow(2).mean(), vals.sum() / n
        loss = mse + self.cfg.l1_coeff * l1
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.tensor(len(cols) / n, device=x_ND.device),
                 "fired_S": torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_ND.device).index_fill_(0, cols, True)}
        return loss, parts, err_ND, mse

    def _relu_dense_loss(self, x_ND, pre_NS):
        """(loss, parts, err_ND, mse) of ReLU + L1 through the hand-written dense objective."""
        loss, mse, l1, f_NS, err_ND = _ReLUObjective.apply(
            x_ND * self.input_scale, self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.cfg.l1_coeff, pre_NS,
            self._buffer("g", pre_NS.shape, x_ND.dtype, x_ND.device),
            self._buffer("mask", pre_NS.shape, torch.bool, x_ND.device))
        parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": torch.count_nonzero(f_NS) / len(f_NS),
                 "fired_S": f_NS.amax(0) > 0}
        return loss, parts, err_ND, mse

    def _sparse_loss(self, x_ND, dead_S, stats):
        vals_NK, idx_NK, xc_ND, pre_NS = self._sparse_code(x_ND, inference=False)
        err_ND = self.decode_sparse_scaled(vals_NK, idx_NK) - x_ND * self.input_scale
        mse = err_ND.pow(2).mean()
        on_NK = vals_NK.detach() > 0
        parts = {"mse": mse.detach(), "l0": on_NK.float().sum(-1).mean()}
        loss = mse
        if dead_S is not None and dead_S.any():
            aux = self._aux_k_loss(pre_NS, err_ND, dead_S, xc_ND, stats)
            loss = loss + self.cfg.aux_coeff * aux
            parts["aux"] = aux.detach()
        if self.cfg.arch == "batchtopk" and self.training:
            self._update_threshold(vals_NK.detach()[on_NK], stats)
        parts["fired_S"] = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_ND.device).index_fill_(
            0, idx_NK[on_NK], True)
        return loss, parts

    @torch.no_grad()
    def _update_threshold(self, kept_vals: torch.Tensor, stats: BatchStats = LOCAL) -> None:
        """EMA of the smallest positive activation the batch selection kept (the first batch sets it): the
        JumpReLU threshold that, on average, keeps what BatchTopK kept."""
        lo = stats.min(kept_vals.min() if kept_vals.numel() else torch.full((), torch.inf, device=kept_vals.device))
        if not torch.isfinite(lo):
            return
        self.threshold.copy_(lo if self.threshold <= 0 else torch.lerp(self.threshold, lo, THRESHOLD_EMA))

    def _ghost_loss(self, x_ND, err_ND, mse, dead_S, stats: BatchStats = LOCAL):
        """Ghost grads: dead latents, with exp() activations, are asked to explain the residual the live
        ones leave, scaled to half its norm; the term is rescaled to the size of the MSE. Gradients reach only
        dead latents' encoder columns, biases and decoder rows."""
        resid_ND = (-err_ND).detach()
        xs_ND = (x_ND * self.input_scale - self.b_dec).detach()
        pre_dead_ND = xs_ND @ self.W_enc[:, dead_S] + self.b_enc[dead_S]
        ghost_out_ND = torch.exp(pre_dead_ND) @ self.W_dec[dead_S]
        scale_N = resid_ND.norm(dim=-1) / (2 * ghost_out_ND.norm(dim=-1) + 1e-6)
        ghost_out_ND = ghost_out_ND * scale_N[:, None].detach()
        ghost_mse = (ghost_out_ND - resid_ND).pow(2).mean()
        return (stats.mean(mse.detach()) / (stats.mean(ghost_mse.detach()) + 1e-6)) * ghost_mse

    def _aux_k_loss(self, pre_NS, err_ND, dead_S, xc_ND=None, stats: BatchStats = LOCAL):
        """AuxK (Gao et al. 2024): the top aux_k dead latents reconstruct the main residual, normalised by
        the residual's variance. Decoded sparsely; with xc_ND (pre_NS then has no graph) the encoder gradient
        also goes through the gathered columns only."""
        aux_k = min(self.cfg.aux_k or self.cfg.d_model // 2, int(dead_S.sum()))
        with torch.no_grad():
            pre_dead_NS = torch.where(dead_S, pre_NS, torch.full_like(pre_NS, -torch.inf))
            idx_NK = pre_dead_NS.topk(aux_k, dim=-1, sorted=False).indices
        vals_NK = (pre_NS.gather(-1, idx_NK) if xc_ND is None
                   else _GatherPreActs.apply(xc_ND, self.W_enc, self.b_enc, self.b_dec, pre_NS, idx_NK))
        resid_ND = (-err_ND).detach()
        recon_ND = F.embedding_bag(idx_NK, self.W_dec, per_sample_weights=F.relu(vals_NK), mode="sum")
        denom = stats.mean((resid_ND - stats.mean(resid_ND.mean(0))).pow(2).mean()).clamp_min(1e-12)
        return (recon_ND - resid_ND).pow(2).mean() / denom
