"""The TopK step's selection and sparse-gradient kernels (sae.topk_select) against torch.topk and dense products."""

from __future__ import annotations

import pytest
import torch

from patchsae.sae.topk_select import GROUPS, latent_sums, topk_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_against_torch(pre_NS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = topk_rows(pre_NS, k)
    ref_vals, ref_idx = pre_NS.topk(k, dim=-1, sorted=False)
    assert vals.shape == idx.shape == (len(pre_NS), k) and idx.dtype == torch.long
    assert torch.equal(vals.sort(-1).values, ref_vals.sort(-1).values)  # the same k values, bit for bit
    assert torch.equal(pre_NS.gather(1, idx), vals)  # each index points at its value
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct latents per row
    return idx, ref_idx


@pytest.mark.parametrize("n,s,k", [(33, 16 * 4 * 4 * GROUPS, 4), (8, 64 * 4 * GROUPS, 64), (5, 4096 + 3, 7)])
def test_topk_rows_equals_torch_topk_on_distinct_values(n, s, k):
    """The grouped path (first two shapes) and the fallback (a width not divisible into groups)."""
    g = torch.Generator().manual_seed(n)
    pre = torch.randn(n, s, generator=g) * torch.linspace(0.1, 3.0, s)  # groups of very different sizes
    idx, ref_idx = _check_against_torch(pre, k)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)  # no ties: the very same latents


def test_topk_rows_with_ties_keeps_the_same_values():
    """Integer-valued rows: many latents tie at the k-th value; any of the tied ones is a correct answer, the
    multiset of values must be torch.topk's and every strictly larger latent must be selected."""
    k, s = 16, 16 * 4 * 16 * GROUPS // 16
    pre = torch.randint(0, 6, (20, s), generator=torch.Generator().manual_seed(1)).float()
    pre[3] = 2.0  # a row that is one tie
    pre[4, :: s // GROUPS] = 9.0  # the maxima of all groups tie
    idx, _ = _check_against_torch(pre, k)
    kth = pre.topk(k, dim=-1).values[:, -1:]
    for row, chosen, t in zip(pre, idx, kth):
        above = set(torch.nonzero(row > t).flatten().tolist())
        assert above <= set(chosen.tolist())


def test_topk_rows_puts_the_top_k_of_one_group_first():
    """All k largest entries in one strided group (the case the k-groups bound exists for)."""
    k, s = 8, 4 * 8 * GROUPS * 2
    pre = torch.zeros(2, s)
    pre[0, 5 :: s // GROUPS] = torch.arange(1, GROUPS + 1).float()  # group 5 holds the GROUPS largest values
    pre[1, -k:] = 7.0
    idx, _ = _check_against_torch(pre, k)
    assert set(idx[0].tolist()) == set(range(5 + (GROUPS - k) * (s // GROUPS), s, s // GROUPS))


@pytest.mark.parametrize("k,d_sae", [(4, 50), (1, 7), (6, 6)])
def test_latent_sums_equal_the_dense_product(k, d_sae):
    """Against w_NS^T @ rows with w_NS the dense scatter of the pairs (repeated latents within a token are
    summed too, as a sparse matrix with duplicate entries would)."""
    g = torch.Generator().manual_seed(k)
    n, d = 30, 9
    idx = torch.randint(0, d_sae, (n, k), generator=g)
    w = torch.randn(n, k, generator=g)
    rows = torch.randn(n, d, generator=g)
    dense_NS = torch.zeros(n, d_sae).scatter_add_(1, idx, w)
    out = latent_sums(idx, w, None, rows, d_sae)
    assert out.shape == (d_sae, d)
    torch.testing.assert_close(out, dense_NS.t() @ rows, atol=1e-5, rtol=1e-5)
    unused = torch.ones(d_sae, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert torch.equal(out[unused], torch.zeros(int(unused.sum()), d))
    assert torch.equal(out, latent_sums(idx, w, None, rows, d_sae))  # deterministic
    # the same pairs given flat, in a shuffled order, with their token rows (the ReLU sparse path's form)
    perm = torch.randperm(n * k, generator=g)
    tok = torch.arange(n).repeat_interleave(k)
    flat = latent_sums(idx.reshape(-1)[perm], w.reshape(-1)[perm], tok[perm], rows, d_sae)
    torch.testing.assert_close(flat, out, atol=1e-5, rtol=1e-5)
