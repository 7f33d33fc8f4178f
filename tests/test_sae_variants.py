"""SAE variants as types: `SAE(cfg)` builds the type registered for `cfg.arch`, each type carries exactly the
state its checkpoints hold, and the shared methods (sparse encoding, raw decoder rows) agree with the dense
forward pass for every variant."""

from __future__ import annotations

import copy

import pytest
import torch

from patchsae import PatchSAEError
from patchsae.sae.model import (ARCHS, SAE, VARIANTS, BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAEConfig, TopKSAE)

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE}
BASE_STATE = ["W_dec", "W_enc", "b_enc", "b_dec", "input_scale"]


def _sae(arch: str, seed: int = 0) -> tuple[SAE, torch.Tensor]:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_model=8, d_sae=40, arch=arch, k=5, init_threshold=0.3))
    x = torch.randn(30, 8) * 2 + 0.5
    sae.init_from_sample(x)
    with torch.no_grad():
        sae.b_enc.normal_(-0.2, 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae, x


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_of_a_config_is_the_registered_type_with_its_checkpoint_keys(arch):
    sae, _ = _sae(arch)
    assert type(sae) is TYPES[arch] is VARIANTS[(arch, "scaled")] and isinstance(sae, SAE)
    extra = {"batchtopk": ["threshold"], "jumprelu": ["log_threshold"]}.get(arch, [])
    # the checkpoint format of the single-class SAE: same keys, same order
    assert sorted(sae.state_dict()) == sorted(BASE_STATE + extra)
    assert [n for n, _ in sae.named_parameters()] == ["W_dec", "W_enc", "b_enc", "b_dec"] + (
        ["log_threshold"] if arch == "jumprelu" else [])
    twin = copy.deepcopy(sae)
    assert type(twin) is type(sae) and all(torch.equal(a, b) for a, b in
                                           zip(twin.state_dict().values(), sae.state_dict().values()))


def test_a_variant_type_refuses_another_architectures_config():
    with pytest.raises(PatchSAEError, match="ReLUSAE is the .relu. SAE with the .scaled. objective, not .topk."):
        ReLUSAE(SAEConfig(d_model=4, d_sae=16, arch="topk", k=2))


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_code_equals_dense_code_for_every_variant(arch):
    """encode_sparse / decode_sparse (inference) against encode / decode, including ReLU and JumpReLU."""
    sae, x = _sae(arch)
    with torch.no_grad():
        f_dense = sae.encode(x)
        vals, idx = sae.encode_sparse(x)
        f_sparse = torch.zeros_like(f_dense).scatter_add_(-1, idx, vals)
        assert (f_dense > 0).any() and (f_dense == 0).any()
        assert torch.allclose(f_sparse, f_dense, atol=1e-6)
        assert torch.allclose(sae.decode_sparse(vals, idx), sae.decode(f_dense), atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_raw_decoder_rows_are_what_one_unit_of_a_latent_adds_to_the_raw_reconstruction(arch):
    sae, _ = _sae(arch)
    with torch.no_grad():
        sae.input_scale.fill_(0.25)
        zero = sae.decode(torch.zeros(1, 40))
        added_SD = sae.decode(torch.eye(40)) - zero
        assert torch.allclose(sae.raw_decoder_rows(), added_SD, atol=1e-5)
        assert torch.equal(sae.raw_decoder_rows([3, 7]), sae.raw_decoder_rows()[[3, 7]])
        assert torch.equal(sae.raw_decoder_rows(5), sae.raw_decoder_rows()[5])
