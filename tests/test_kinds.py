"""Latent kinds on hand-made SAE codes with planted latents, streamed through the `analyze` accumulator."""

from __future__ import annotations

import math

import pytest
import torch

from patchsae import PatchSAEError
from patchsae.analysis import kinds, latents

GRID = (4, 4)
T = 1 + GRID[0] * GRID[1]  # CLS + patches
N, C, S = 200, 5, 7
ALWAYS, POSITION, CLASS3, DEAD, SPREAD, MOSTLY1, RARE = range(S)
POS = 1 + 2 * GRID[1] + 1  # patch (2, 1)


def planted_codes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_NTS, label_N): N images of C balanced classes and S planted latents."""
    g = torch.Generator().manual_seed(seed)
    label_N = torch.arange(N) % C
    f_NTS = torch.zeros(N, T, S)
    f_NTS[:, :, ALWAYS] = 0.5 + 0.1 * torch.rand(N, T, generator=g)  # every token of every image
    f_NTS[:, POS, POSITION] = 1.0 + torch.rand(N, generator=g)  # one patch of every image, whatever the image
    patches_NT = torch.rand(N, T, generator=g) < 0.4
    patches_NT[:, 0] = False
    f_NTS[:, :, CLASS3] = torch.where((label_N[:, None] == 3) & patches_NT, 0.8, 0.0)  # only class 3
    some_N = torch.rand(N, generator=g) < 0.3  # 30 % of the images of every class, anywhere
    f_NTS[:, :, SPREAD] = torch.where(some_N[:, None] & patches_NT, 0.6, 0.0)
    f_NTS[:, :, MOSTLY1] = torch.where(((label_N == 1) | ((label_N == 2) & (torch.arange(N) % 3 == 0)))[:, None]
                                       & patches_NT, 0.7, 0.0)  # class 1, and a third of class 2
    f_NTS[0, 3, RARE] = f_NTS[5, 7, RARE] = 0.9  # two tokens of class 0: selective in share, too few to tell
    return f_NTS, label_N


def streamed_stats(f_NTS: torch.Tensor, label_N: torch.Tensor, batch: int = 32) -> latents.LatentStats:
    acc = latents.LatentAccumulator(S, C, T, k=5, tau=0.2)
    patch_rows_T = torch.arange(T) > 0
    for s in range(0, N, batch):
        acc.update(f_NTS[s: s + batch], label_N[s: s + batch], torch.arange(s, min(s + batch, N)), patch_rows_T)
    return acc.result()


@pytest.fixture(scope="module")
def planted():
    f_NTS, label_N = planted_codes()
    stats = streamed_stats(f_NTS, label_N)
    lk = kinds.classify(stats.fired_S, stats.frequency_S, stats.class_counts_CS, stats.position_mass_ST,
                        stats.class_images_C, kinds.KindThresholds(min_count=5))
    entropy_S, _ = latents.label_entropy(stats.top_value_SK, stats.top_label_SK, C)
    return f_NTS, label_N, stats, lk, entropy_S


def test_each_planted_latent_gets_its_kind(planted):
    _, _, _, lk, _ = planted
    assert lk.names() == ["dense", "positional", "class-selective", "dead", "other", "class-selective", "other"]
    assert lk.counts() == {"class-selective": 2, "other": 2, "positional": 1, "dense": 1, "dead": 1}


def test_statistics_behind_the_kinds_against_direct_computation(planted):
    f_NTS, label_N, stats, lk, _ = planted
    counts_CS = torch.zeros(C, S, dtype=torch.long).index_add_(0, label_N, (f_NTS > 0.2).sum(1))
    p_CS = counts_CS.double() / counts_CS.sum(0).clamp_min(1)  # balanced classes: rates are plain shares
    alive = counts_CS.sum(0) > 0
    torch.testing.assert_close(lk.class_share_S[alive], p_CS.max(0).values[alive].float())
    assert lk.class_share_S[CLASS3] == 1.0 and lk.top_class_S[CLASS3] == 3 and lk.class_entropy_S[CLASS3] == 0
    assert lk.class_entropy_S[DEAD] == 1 and lk.top_class_S[DEAD] == -1 and lk.class_share_S[DEAD] == 0
    assert lk.class_entropy_S[ALWAYS] > 0.99  # near-uniform over five classes
    p1 = p_CS[:, MOSTLY1][p_CS[:, MOSTLY1] > 0]
    torch.testing.assert_close(float(lk.class_entropy_S[MOSTLY1]), float(-(p1 * p1.log()).sum() / math.log(C)),
                               rtol=1e-5, atol=1e-6)
    mass_ST = f_NTS.double().sum(0).T
    torch.testing.assert_close(lk.position_share_S[ALWAYS], (mass_ST[ALWAYS].max() / mass_ST[ALWAYS].sum()).float())
    assert lk.position_share_S[POSITION] == 1.0 and lk.top_position_S[POSITION] == POS
    assert lk.top_position_S[DEAD] == -1 and lk.position_share_S[DEAD] == 0
    assert kinds.position_label(int(lk.top_position_S[POSITION]), GRID) == "patch (2, 1)"
    assert kinds.position_label(0, GRID) == "CLS" and kinds.position_label(-1, GRID) == ""


def test_most_interpretable_order(planted):
    _, _, stats, lk, entropy_S = planted
    # class-selective by selectivity (class 3 only before mostly class 1), then the rest by share; dense, positional
    # and dead latents are left out unless asked for
    assert kinds.interpretable_order(lk, entropy_S, stats.frequency_S) == [CLASS3, MOSTLY1, RARE, SPREAD]
    every = kinds.interpretable_order(lk, entropy_S, stats.frequency_S, kinds.KINDS[:-1])
    assert every == [CLASS3, MOSTLY1, RARE, SPREAD, POSITION, ALWAYS]
    assert kinds.interpretable_order(lk, entropy_S, stats.frequency_S, ["dense"]) == [ALWAYS]
    with pytest.raises(PatchSAEError, match="kinds to show must be some of"):
        kinds.interpretable_order(lk, entropy_S, stats.frequency_S, ["dead"])


def test_class_view_orders_by_specificity_not_raw_count(planted):
    _, _, stats, lk, _ = planted
    p_CS = kinds.class_shares(stats.class_counts_CS, stats.class_images_C)
    raw = torch.argsort(stats.class_counts_CS[3], descending=True).tolist()
    assert raw[0] == ALWAYS  # the raw count puts the dense latent first in every class
    assert kinds.class_specific_order(p_CS, stats.class_counts_CS, 3)[:2] == [CLASS3, SPREAD]
    assert kinds.class_specific_order(p_CS, stats.class_counts_CS, 1)[0] == MOSTLY1
    assert RARE in kinds.class_specific_order(p_CS, stats.class_counts_CS, 0)
    assert RARE not in kinds.class_specific_order(p_CS, stats.class_counts_CS, 0, min_count=5)


def test_class_shares_account_for_class_sizes():
    counts_CS = torch.tensor([[90], [10]])
    p_CS = kinds.class_shares(counts_CS, torch.tensor([900, 100]))  # same rate per image in both classes
    torch.testing.assert_close(p_CS[:, 0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(kinds.class_shares(counts_CS)[:, 0], torch.tensor([0.9, 0.1]))


def test_relative_activation_and_honest_names():
    mean_act_S = torch.tensor([0.5, 0.0, 2.0])
    rel = kinds.relative_activation(torch.tensor([1.0, 0.3, 1.0]), torch.tensor([0, 1, 2]), mean_act_S)
    torch.testing.assert_close(rel, torch.tensor([2.0, 0.0, 0.5]))
    assert kinds.honest_name("bag", 0.712, "class-selective") == "bag (0.71)"
    assert kinds.honest_name("t-shirt", 0.5, "other") == "t-shirt? (non-selective, 0.50)"
    assert kinds.honest_name("bag", 0.66, "positional") == "bag? (positional, 0.66)"
    assert kinds.honest_name("bag", 0.66, "dead") == "" and kinds.honest_name("", 0, "dense") == ""


def test_thresholds_are_checked():
    with pytest.raises(PatchSAEError, match="dense-frequency must be in"):
        kinds.KindThresholds(dense_frequency=0)
    with pytest.raises(PatchSAEError, match="min-count"):
        kinds.KindThresholds(min_count=-1)
