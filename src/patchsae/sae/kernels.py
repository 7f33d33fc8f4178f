"""The fast kernels every SAE variant shares: autograd Functions with hand-written backwards that avoid the
dense (tokens x d_sae) temporaries autograd would build, and the reused (tokens x d_sae) workspaces."""

from __future__ import annotations

import torch

from patchsae.sae.topk_select import latent_sums


class Workspaces:
    """(tokens x d_sae) workspaces reused from step to step: on CPU a fresh 800 MB tensor (4,096 x 49,152)
    costs more in page faults than its copy. A workspace's contents live until the next call that asks for it.
    Not module state: never saved, never moved by `.to()`."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != shape or buf.device != device or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


class GatherPreActs(torch.autograd.Function):
    """vals_NK = pre_NS[n, idx_NK] where pre_NS = (x_ND - b_dec) @ W_enc + b_enc (x already scaled) was
    computed without a graph.

    The backward touches only the gathered (token, latent) pairs, as sparse products (embedding bags over the
    pairs sorted by latent, sae/topk_select.latent_sums), instead of the dense (tokens x d_sae) gradient
    autograd would build through pre_NS. x is data and gets no gradient, so b_dec's
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
        s = W_enc.shape[1]
        cols, g = idx_NK.reshape(-1), g_NK.reshape(-1)
        # (d_sae, d_model) rows transposed: the layout of W_enc itself, so autograd keeps it without a copy
        gW = latent_sums(idx_NK, g_NK, rows, xc_ND, s).t() if ctx.needs_input_grad[1] else None
        gb = torch.zeros(s, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        gb_dec = -(W_enc @ gb) if ctx.needs_input_grad[3] else None
        return None, gW, gb if ctx.needs_input_grad[2] else None, gb_dec, None, None, None


class ReLUObjective(torch.autograd.Function):
    """The ReLU SAE's MSE + lambda * L1 with a hand-written backward, returning (loss, mse, l1, f_NS, err_ND).

    Autograd would build six (tokens x d_sae) temporaries and six GEMMs of that size; this keeps two
    temporaries (f, and its gradient, both updated in place) and five GEMMs: b_dec's gradient through the
    encoder is -(sum_n g_pre[n]) W_enc^T, a GEMV, where autograd forms the whole (tokens x d_model) product."""

    @staticmethod
    def forward(ctx, xs_ND, W_enc, b_enc, W_dec, b_dec, l1_coeff, pre_NS, g_out, mask_out, w_N=None):
        """pre_NS = (xs - b_dec) W_enc + b_enc, computed by the caller without a graph; it becomes f in place.
        w_N (tokens,), optional: per-token weights of the squared error (the reference objective's
        c_n / ||x_n||); mse = mean over (token, dim) of w_n * err^2."""
        xc_ND = xs_ND - b_dec
        f_NS = pre_NS.relu_()
        err_ND = torch.addmm(b_dec, f_NS, W_dec).sub_(xs_ND)
        n = len(xs_ND)
        sq_ND = err_ND.pow(2) if w_N is None else err_ND.pow(2).mul_(w_N[:, None])
        mse, l1 = sq_ND.mean(), f_NS.sum() / n  # f >= 0: the L1 norm is the sum
        ctx.w_N = w_N
        ctx.save_for_backward(xc_ND, f_NS, err_ND, W_enc, W_dec)
        ctx.l1_coeff, ctx.g_out, ctx.mask_out = l1_coeff, g_out, mask_out
        ctx.mark_non_differentiable(f_NS, err_ND)
        return mse + l1_coeff * l1, mse, l1, f_NS, err_ND

    @staticmethod
    def backward(ctx, g_loss, g_mse, g_l1, _g_f, _g_err):
        xc_ND, f_NS, err_ND, W_enc, W_dec = ctx.saved_tensors
        n, d = err_ND.shape
        g_err_ND = err_ND * ((g_loss + g_mse) * (2.0 / (n * d)))
        if ctx.w_N is not None:
            g_err_ND.mul_(ctx.w_N[:, None])
        g_NS = torch.mm(g_err_ND, W_dec.t(), out=ctx.g_out).add_((g_loss * ctx.l1_coeff + g_l1) / n)
        g_NS.masked_fill_(torch.le(f_NS, 0, out=ctx.mask_out), 0.0)  # through the ReLU, in place
        gb_enc = g_NS.sum(0)
        gx = g_err_ND - g_NS @ W_enc.t() if ctx.needs_input_grad[0] else None
        return (gx, torch.mm(xc_ND.t(), g_NS), gb_enc, torch.mm(f_NS.t(), g_err_ND),
                g_err_ND.sum(0) - W_enc @ gb_enc, None, None, None, None, None)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
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
        g_theta = -(theta_S / ctx.eps) * rectangle((pre_NS - theta_S) / ctx.eps) * g_NS
        return g_pre, g_theta.reshape(-1, theta_S.shape[-1]).sum(0), None


class StepFn(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty: no gradient to pre, the STE -(1/eps) K((pre-theta)/eps) to theta."""

    @staticmethod
    def forward(ctx, pre_NS, theta_S, eps):
        ctx.save_for_backward(pre_NS, theta_S)
        ctx.eps = eps
        return (pre_NS > theta_S).to(pre_NS.dtype)

    @staticmethod
    def backward(ctx, g_NS):
        pre_NS, theta_S = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * rectangle((pre_NS - theta_S) / ctx.eps) * g_NS
        return None, g_theta.reshape(-1, theta_S.shape[-1]).sum(0), None


def mask_to_pairs(f_NS: torch.Tensor, keep_NS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx_NK, keep_NK) for the kept entries of each row, padded to the longest row (at least one column);
    padding has keep False."""
    k = max(1, int(keep_NS.sum(-1).max())) if keep_NS.numel() else 1
    idx_NK = f_NS.masked_fill(~keep_NS, -torch.inf).topk(k, dim=-1, sorted=False).indices
    return idx_NK, keep_NS.gather(-1, idx_NK)
