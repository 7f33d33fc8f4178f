"""Foreign SAE formats, against the real libraries: our exports open in SAELens and sparsify with the same codes
and reconstructions, SAEs those libraries saved import here with their codes, and hostile or broken files
give one PatchSAEError line."""

from __future__ import annotations

import json
import math
import pickle
from collections import OrderedDict

import pytest
import torch
from helpers import reference_config_class

from patchsae import PatchSAEError
from patchsae.sae.formats import detect_format, read_sae, write_sae
from patchsae.sae.formats.common import plain_from_sae
from patchsae.sae.formats.saev import write_saev
from patchsae.sae.model import SAE, SAEConfig
from patchsae.utils import atomic_dir

pytestmark = pytest.mark.usefixtures("one_thread")
D, S, K = 24, 96, 6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def acts(n=200, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * 3.0 + torch.linspace(-2, 2, D)


def make_sae(arch: str, seed=0) -> SAE:
    """An SAE with every parameter moved off its initial value and an input scale far from 1."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(D, S, arch, k=K))
    sae.init_from_sample(acts(500, seed=9))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(S) * 0.3)
        sae.W_enc.add_(torch.randn(D, S) * 0.05)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(S).uniform_(math.log(0.05), math.log(0.6)))
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    assert abs(float(sae.input_scale) - 1) > 0.2
    return sae.eval()


def export(sae: SAE, tmp_path, fmt: str, name="out", **kw):
    with atomic_dir(tmp_path / name) as tmp:
        write_sae(sae, tmp, fmt, **kw)
    return tmp_path / name


# ---- SAELens -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,expect", [("relu", "StandardSAE"), ("topk", "TopKSAE"), ("jumprelu", "JumpReLUSAE"),
                                         ("batchtopk", "JumpReLUSAE")])
def test_export_opens_in_saelens_with_our_codes(tmp_path, arch, expect):
    from sae_lens import SAE as LensSAE

    sae = make_sae(arch)
    out = export(sae, tmp_path, "saelens", model="openai/clip-vit-base-patch16", layer=10, tokens="all")
    theirs = LensSAE.load_from_disk(str(out))
    assert type(theirs).__name__ == expect
    assert theirs.cfg.metadata.hook_name == "blocks.10.hook_resid_post"
    x = acts()
    with torch.no_grad():
        f_ours, f_theirs = sae.encode(x), theirs.encode(x)
        assert (f_ours > 0).float().sum(-1).mean() > 2  # the comparison is not between empty codes
        assert rel(f_theirs, f_ours) <= 1e-5
        assert rel(theirs.decode(f_theirs), sae.decode(f_ours)) <= 1e-5


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_own_saelens_export_comes_back_unchanged(tmp_path, arch):
    sae = make_sae(arch)
    out = export(sae, tmp_path, "saelens", model="m", layer=-2, tokens="patch", dataset="d")
    back = read_sae(out)
    assert (back.format, back.model, back.layer, back.tokens, back.dataset) == ("saelens", "m", -2, "patch", "d")
    assert back.sae.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert rel(back.sae.state_dict()[name], t) <= 1e-6, name
    x = acts()
    assert rel(back.sae.encode(x), sae.encode(x)) <= 1e-5


def _lens_sae(arch: str, **cfg_kw):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(3)
    meta = {"model_name": "openai/clip-vit-base-patch16", "hook_name": "blocks.7.hook_resid_post"}
    cls, cfg_cls = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
                    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[arch]
    cfg = cfg_cls(d_in=D, d_sae=S, **({"k": K} if arch == "topk" else {}), **cfg_kw)
    cfg.metadata.model_name, cfg.metadata.hook_name = meta["model_name"], meta["hook_name"]
    lens = cls(cfg)
    with torch.no_grad():
        lens.W_dec.mul_(torch.rand(S, 1) + 0.5)  # rows of unequal norm, as a trained SAE has
        lens.b_enc.copy_(torch.randn(S) * 0.3)
        lens.b_dec.copy_(torch.randn(D))
        if arch == "jumprelu":
            lens.threshold.copy_(torch.rand(S) * 0.5)
            lens.threshold[:3] = torch.tensor([0.0, -0.1, 0.0])  # theta <= 0: plain ReLU there
    return lens.eval()


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("topk", {}), ("jumprelu", {}),
                                     ("standard", {"apply_b_dec_to_input": False}),
                                     ("topk", {"rescale_acts_by_decoder_norm": True})])
def test_saelens_saved_sae_imports_with_its_codes(tmp_path, arch, kw):
    lens = _lens_sae(arch, **kw)
    lens.save_model(tmp_path / "lens")
    got = read_sae(tmp_path / "lens")
    assert (got.format, got.model, got.layer) == ("saelens", "openai/clip-vit-base-patch16", 7)
    x = acts() * 0.3
    with torch.no_grad():
        f_lens, f_ours = lens.encode(x), got.sae.encode(x)
        assert (f_lens > 0).float().sum(-1).mean() > 2
        assert rel(f_ours, f_lens) <= 1e-5
        assert rel(got.sae.decode(f_ours), lens.decode(f_lens)) <= 1e-5


def test_saelens_layer_norm_sae_is_refused(tmp_path):
    lens = _lens_sae("standard", normalize_activations="layer_norm")
    lens.save_model(tmp_path / "ln")
    with pytest.raises(PatchSAEError, match="normalize_activations='layer_norm'"):
        read_sae(tmp_path / "ln")


# ---- sparsify ------------------------------------------------------------------------------------------------
def _dense(acts_NK, idx_NK) -> torch.Tensor:
    return torch.zeros(len(acts_NK), S).scatter_(-1, idx_NK.long(), acts_NK.float())


def test_export_opens_in_sparsify_with_our_codes(tmp_path):
    from sparsify import SparseCoder

    sae = make_sae("topk")
    out = export(sae, tmp_path, "sparsify")
    theirs = SparseCoder.load_from_disk(out)
    x = acts()
    with torch.no_grad():
        enc = theirs.encode(x)
        f_theirs = _dense(enc.top_acts, enc.top_indices)
        f_ours = sae.encode(x)
        assert rel(f_theirs, f_ours) <= 1e-5
        assert rel(theirs.decode(enc.top_acts, enc.top_indices), sae.decode(f_ours)) <= 1e-5
    back = read_sae(out)
    assert back.format == "sparsify" and back.sae.cfg == sae.cfg


def test_sparsify_saved_sae_imports_with_its_codes(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(4)
    coder = SparseCoder(D, SparseCoderConfig(k=K, num_latents=S))
    with torch.no_grad():
        coder.encoder.bias.copy_(torch.randn(S) * 0.2)
        coder.b_dec.copy_(torch.randn(D))
    coder.save_to_disk(tmp_path / "repo" / "layers.5")
    got = read_sae(tmp_path / "repo")  # the repo folder with one hookpoint resolves to it
    assert (got.format, got.layer, got.sae.cfg.arch, got.sae.cfg.k) == ("sparsify", 5, "topk", K)
    x = acts()
    with torch.no_grad():
        enc = coder.encode(x)
        f_ours = got.sae.encode(x)
        assert rel(f_ours, _dense(enc.top_acts, enc.top_indices)) <= 1e-5
        assert rel(got.sae.decode(f_ours), coder.decode(enc.top_acts, enc.top_indices)) <= 1e-5


def test_sparsify_export_of_relu_is_one_line(tmp_path):
    with pytest.raises(PatchSAEError, match="only TopK"):
        export(make_sae("relu"), tmp_path, "sparsify")
    assert not (tmp_path / "out").exists()


# ---- saev ----------------------------------------------------------------------------------------------------
def test_saev_current_schema_matches_its_encoder(tmp_path):
    """Schema 5 encodes x W_enc + b_enc (no b_dec subtraction): compare with that formula on the raw tensors."""
    sae = make_sae("topk")
    write_saev(tmp_path / "sae.pt", plain_from_sae(sae))
    got = read_sae(tmp_path / "sae.pt")
    assert got.format == "saev" and got.sae.cfg.k == K
    x = acts()
    assert rel(got.sae.encode(x), sae.encode(x)) <= 1e-5


def test_saev_legacy_header_subtracts_b_dec(tmp_path):
    torch.manual_seed(5)
    W_enc, b_enc, W_dec, b_dec = torch.randn(D, S) * 0.2, torch.randn(S) * 0.1, torch.randn(S, D), torch.randn(D)
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as f:
        f.write((json.dumps({"d_vit": D, "exp_factor": S // D, "d_sae": S, "seed": 0}) + "\n").encode())
        torch.save({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, f)
    got = read_sae(path)
    x = acts()
    f_want = torch.relu((x - b_dec) @ W_enc + b_enc)
    assert rel(got.sae.encode(x), f_want) <= 1e-5
    assert rel(got.sae.decode(f_want), f_want @ W_dec + b_dec) <= 1e-5


def test_saev_batchtopk_threshold(tmp_path):
    torch.manual_seed(6)
    W_enc, b_enc, W_dec, b_dec = torch.randn(D, S) * 0.2, torch.randn(S) * 0.1, torch.randn(S, D), torch.randn(D)
    header = {"schema": 4, "cfg": {"d_model": D, "d_sae": S, "activation": {"cls": "BatchTopK",
                                                                           "params": {"top_k": 8}}}}
    path = tmp_path / "btk.pt"
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                    "activation.threshold": torch.tensor(0.5)}, f)
    h = acts() @ W_enc + b_enc
    assert rel(read_sae(path).sae.encode(acts()), torch.where(h > 0.5, h, torch.zeros_like(h))) <= 1e-5


# ---- the reference checkpoint ----------------------------------------------------------------------------------
@pytest.fixture
def reference_module(monkeypatch):
    return reference_config_class(monkeypatch, D)


def _reference_state(d_in=D):
    torch.manual_seed(7)
    return OrderedDict(W_enc=torch.randn(d_in, S) * 0.2, b_enc=torch.randn(S) * 0.1, W_dec=torch.randn(S, d_in),
                       b_dec=torch.randn(d_in))


def test_reference_checkpoint_imports_with_its_cfg(tmp_path, reference_module):
    state = _reference_state()
    torch.save({"cfg": reference_module(), "state_dict": state}, tmp_path / "out.pt")
    assert detect_format(tmp_path / "out.pt")[0] == "reference"
    got = read_sae(tmp_path / "out.pt")
    assert (got.model, got.layer, got.tokens) == ("openai/clip-vit-base-patch16", -2, "all")
    assert got.sae.cfg.arch == "relu" and got.sae.cfg.l1_coeff == 8e-5
    x = acts()
    f_want = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    assert rel(got.sae.encode(x), f_want) <= 1e-5
    assert rel(got.sae.decode(f_want), f_want @ state["W_dec"] + state["b_dec"]) <= 1e-5


class _Payload:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _Shell:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def test_hostile_reference_pickle_runs_nothing(tmp_path, reference_module):
    marker, marker2 = tmp_path / "pwned", tmp_path / "pwned2"
    cfg = reference_module(model_name="evil/model")
    cfg.extra = _Payload(f"open({str(marker)!r}, 'w').write('x')")
    blob = {"cfg": cfg, "state_dict": _reference_state(), "hook": _Shell(f"touch {marker2}")}
    torch.save(blob, tmp_path / "evil.pt")
    # the payloads are live: a plain unpickler runs them
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Shell(f"touch {proof}")))
    assert proof.exists()
    proof.unlink()
    pickle.loads(pickle.dumps(_Payload(f"open({str(proof)!r}, 'w').write('x')")))
    assert proof.exists()
    got = read_sae(tmp_path / "evil.pt")
    assert not marker.exists() and not marker2.exists()
    assert got.model == "evil/model" and got.sae.cfg.d_sae == S


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


def test_reference_wrong_width_truncated_and_random_bytes(tmp_path, reference_module):
    bad = _reference_state()
    bad["b_dec"] = torch.zeros(D + 1)
    torch.save({"cfg": reference_module(), "state_dict": bad}, tmp_path / "width.pt")
    with pytest.raises(PatchSAEError) as e:
        read_sae(tmp_path / "width.pt")
    assert "b_dec has shape (25,)" in _one_line(e)

    torch.save({"cfg": reference_module(d_in=D * 2), "state_dict": _reference_state()}, tmp_path / "cfgw.pt")
    with pytest.raises(PatchSAEError) as e:
        read_sae(tmp_path / "cfgw.pt")
    assert "d_in=48" in _one_line(e)

    good = tmp_path / "good.pt"
    torch.save({"cfg": reference_module(), "state_dict": _reference_state()}, good)
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(PatchSAEError) as e:
            read_sae(tmp_path / "cut.pt")
        _one_line(e)

    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(PatchSAEError) as e:
        read_sae(tmp_path / "noise.pt")
    _one_line(e)
    with pytest.raises(PatchSAEError) as e:
        read_sae(tmp_path / "noise.pt", fmt="reference")
    _one_line(e)
    with pytest.raises(PatchSAEError) as e:
        read_sae(tmp_path / "noise.pt", fmt="saev")
    _one_line(e)


# ---- detection, our own folder, atomic output ----------------------------------------------------------------
def test_detection_errors_and_own_folder(tmp_path):
    from patchsae.sae.checkpoint import save_sae

    sae = make_sae("topk")
    save_sae(tmp_path / "run" / "sae", sae, {"model": "embedded", "layer": -2, "tokens": "all"})
    got = read_sae(tmp_path / "run")
    assert got.format == "patchsae" and got.model == "embedded" and got.sae.cfg == sae.cfg
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchSAEError, match="no SAE found"):
        read_sae(tmp_path / "empty")
    export(sae, tmp_path / "two", "saelens", name="a")
    export(sae, tmp_path / "two", "sparsify", name="b")
    with pytest.raises(PatchSAEError, match="holds 2 SAEs"):
        read_sae(tmp_path / "two")
    assert read_sae(tmp_path / "two", fmt="sparsify").format == "sparsify"
    with pytest.raises(PatchSAEError, match="no such file"):
        read_sae(tmp_path / "missing")


def test_atomic_dir_refuses_then_replaces_only_on_success(tmp_path):
    out = export(make_sae("relu"), tmp_path, "saelens")
    before = (out / "cfg.json").read_text()
    with pytest.raises(PatchSAEError, match="--force"):
        export(make_sae("topk"), tmp_path, "saelens")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "cfg.json").write_text("half")
            raise RuntimeError("killed")
    assert (out / "cfg.json").read_text() == before
    with atomic_dir(out, force=True) as tmp:
        write_sae(make_sae("topk"), tmp, "saelens")
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "topk"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


# ---- the Hugging Face hub --------------------------------------------------------------------------------------
def test_hub_source_from_cache_offline_and_unreachable_hub(tmp_path, monkeypatch):
    """huggingface_hub's own cache lookup (HF_HUB_OFFLINE=1 in the tests) finds a cached snapshot; without one
    the error says how to download it elsewhere."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PatchSAEError) as e:
        read_sae("hf:someone/clip-sae")
    msg = _one_line(e)
    assert "hf download someone/clip-sae --local-dir clip-sae" in msg and "HF_HUB_OFFLINE" in msg
    assert "--sae clip-sae" in msg

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--clip-sae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sae = make_sae("jumprelu")
    export(sae, repo / "snapshots" / commit, "saelens", name="block10", model="openai/clip-vit-base-patch16",
           layer=10)
    got = read_sae("hf:someone/clip-sae/block10")
    assert got.format == "saelens" and got.source == "hf:someone/clip-sae/block10" and got.layer == 10
    assert rel(got.sae.encode(acts()), sae.encode(acts())) <= 1e-5
    with pytest.raises(PatchSAEError, match="hf:OWNER/REPO"):
        read_sae("hf:just-a-name")
    export(sae, repo / "snapshots" / commit, "saelens", name="block11", layer=11)
    with pytest.raises(PatchSAEError, match=r"hf:someone/clip-sae holds 2 SAEs \(block10, block11\); pass "
                                            r"hf:someone/clip-sae/NAME"):
        read_sae("hf:someone/clip-sae")


def test_hub_folder_opens_in_saelens_and_here_and_has_a_model_card(tmp_path):
    from huggingface_hub import ModelCard
    from sae_lens import SAE as LensSAE

    from patchsae.sae.formats.hub import write_hub

    sae = make_sae("topk")
    (tmp_path / "stats.safetensors").write_bytes(b"x")
    metrics = {"explained_variance": 0.95, "mse": 0.01, "l0_per_token": 6.0, "dead_fraction": 0.02,
               "zero_shot_accuracy": 0.85, "spliced_accuracy": 0.84, "n_tokens": 1000}
    with atomic_dir(tmp_path / "hub") as tmp:
        write_hub(tmp, sae, model="openai/clip-vit-base-patch16", layer=10, tokens="all", dataset="imagenet-1k",
                  run_config={"arch": "topk"}, metrics=metrics, analysis_files=[tmp_path / "stats.safetensors"],
                  train_info={"tokens_trained": 12345})
    out = tmp_path / "hub"
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "patchsae"
    assert card.data.base_model == "openai/clip-vit-base-patch16"
    assert card.data.datasets == ["imagenet-1k"] and "sparse-autoencoder" in card.data.tags
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results}["explained_variance"] == pytest.approx(0.95)
    assert "| tokens trained | 12345 |" in card.text and "SAE.load_from_disk" in card.text
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "analysis" / "stats.safetensors").read_bytes() == b"x"
    x = acts()
    assert rel(LensSAE.load_from_disk(str(out)).encode(x), sae.encode(x)) <= 1e-5
    back = read_sae(out)
    assert back.sae.cfg == sae.cfg and back.dataset == "imagenet-1k"


def test_check_fits_width_and_layers():
    from dataclasses import replace

    from patchsae.sae.formats import ForeignSAE, check_fits

    f = ForeignSAE(make_sae("relu"), "saelens", "x", model="m", layer=10)
    assert check_fits(f, D, 12, None) == 10 and check_fits(f, D, 12, -2) == 10
    with pytest.raises(PatchSAEError, match="width 24, but the model's blocks have width 32"):
        check_fits(f, 32, 12, None)
    with pytest.raises(PatchSAEError, match="block 10 \\(from its file\\) does not exist in a model with 4 blocks"):
        check_fits(f, D, 4, None)
    with pytest.raises(PatchSAEError, match="asks for block 9"):
        check_fits(f, D, 12, 9)
    with pytest.raises(PatchSAEError, match="pass --layer"):
        check_fits(replace(f, layer=None), D, 12, None)
    assert check_fits(replace(f, layer=None), D, 12, -1) == 11


def test_read_config_file_json_toml_and_errors(tmp_path):
    from patchsae.utils import read_config_file

    (tmp_path / "a.json").write_text('{"lr": 0.001, "arch": "topk"}')
    (tmp_path / "a.toml").write_text('lr = 0.001\narch = "topk"\n[train]\nepochs = 2.0\n')
    assert read_config_file(tmp_path / "a.json") == {"lr": 0.001, "arch": "topk"}
    assert read_config_file(tmp_path / "a.toml") == {"lr": 0.001, "arch": "topk", "train": {"epochs": 2.0}}
    for name, text, msg in (("b.json", "{lr: 1", "not valid JSON"), ("b.toml", "lr = = 1", "not valid TOML"),
                            ("c.json", "[1, 2]", "mapping")):
        (tmp_path / name).write_text(text)
        with pytest.raises(PatchSAEError, match=msg) as e:
            read_config_file(tmp_path / name)
        _one_line(e)
    with pytest.raises(PatchSAEError, match="cannot read"):
        read_config_file(tmp_path / "missing.json")
