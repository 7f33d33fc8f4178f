"""The SAE trainer and its files: exact resume after an interruption, refusal of foreign checkpoints, NaN
handling, checkpoint validation and atomic writes."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from patchsae import PatchSAEError
from patchsae.sae.checkpoint import load_sae, load_training_state, save_sae, save_training_state
from patchsae.sae.model import SAE, SAEConfig
from patchsae.sae.train import TrainConfig, make_optimizer, train_sae, train_step

from helpers import MemTokens, _data


pytestmark = pytest.mark.usefixtures("one_thread")


# d_sae 64 and a high L1 so that some latents die within `dead_steps` and ghost grads run during the test
SAE_CFG = SAEConfig(d_model=16, d_sae=64, l1_coeff=0.5, dead_steps=4)
TRAIN_CFG = TrainConfig(total_tokens=40 * 64, batch_tokens=64, lr=1e-2, warmup_steps=5, seed=3, init_tokens=512,
                        checkpoint_every=7, log_every=1)


def _log_steps(folder):
    with open(folder / "train_log.csv") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def _log_rows(folder):
    with open(folder / "train_log.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _tmp_files(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    a = tmp_path_factory.mktemp("full")
    sae = train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data()), a, progress=False)
    return a, sae


def test_uninterrupted_run_writes_its_files(full_run):
    a, sae = full_run
    for name in ("model.safetensors", "config.json", "checkpoint.safetensors", "train_log.csv"):
        assert (a / name).is_file(), name
    assert _log_steps(a) == list(range(1, 41))
    meta = json.loads((a / "config.json").read_text())
    assert meta["tokens_trained"] == 40 * 64
    assert meta["sae"] == SAE_CFG.to_json()
    # the in-memory result is what was saved
    saved = load_file(str(a / "model.safetensors"))
    for k, v in sae.state_dict().items():
        assert torch.equal(saved[k], v.detach().cpu()), k
    # ghost grads were exercised: some latent was dead at some logged step
    with open(a / "train_log.csv") as f:
        assert max(float(r["dead_fraction"]) for r in csv.DictReader(f)) > 0
    assert _tmp_files(a) == []


# m batches, not a multiple of checkpoint_every (7): the steps after the last checkpoint are lost. At 24 some
# latents are dead, so the restored dead-latent counters matter as well as the Adam moments.
@pytest.mark.parametrize("error,m", [(RuntimeError, 17), (KeyboardInterrupt, 24)])
def test_resume_after_interruption_gives_identical_weights(full_run, tmp_path, error, m):
    a, _ = full_run
    b = tmp_path / "b"
    last_ckpt = m // 7 * 7
    with pytest.raises(error):
        train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data(), fail_after=m, error=error), b, progress=False)
    assert not (b / "model.safetensors").exists()
    step, _, _ = load_training_state(b / "checkpoint.safetensors", SAE(SAE_CFG),
                                     torch.optim.Adam(SAE(SAE_CFG).parameters()))
    assert step == last_ckpt
    assert _log_steps(b) == list(range(1, last_ckpt + 1))
    assert _tmp_files(b) == []

    resumed_source = MemTokens(_data())
    train_sae(SAE_CFG, TRAIN_CFG, resumed_source, b, progress=False)
    assert resumed_source.produced == 40 - last_ckpt  # it continued, it did not start again

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, (wa[k] - wb[k]).abs().max())  # bit-identical
    steps = _log_steps(b)
    assert steps == sorted(set(steps)) == list(range(1, 41))
    assert _log_rows(b) == _log_rows(a)  # same losses at every step, as numbers
    assert json.loads((b / "config.json").read_text())["tokens_trained"] == 40 * 64
    assert _tmp_files(b) == []


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_fused_adam_continues_bit_identically_from_a_checkpoint(tmp_path, arch):
    """The trainer's Adam is the fused kernel, and a checkpoint restores it exactly: its moments come back in
    each parameter's own memory layout (W_enc is column-major; restored row-major, the fused kernel paired
    moments with the wrong entries and a resumed run diverged by 0.2 within a step)."""
    cfg = SAEConfig(d_model=16, d_sae=64, arch=arch, k=4)
    x = _data()[:128]

    def steps(sae, opt, n):
        for _ in range(n):
            opt.zero_grad()
            sae.loss(x)[0].backward()
            opt.step()

    torch.manual_seed(0)
    a = SAE(cfg)
    a.init_from_sample(x)
    opt_a = make_optimizer(a, 1e-2)
    assert opt_a.defaults["fused"]
    steps(a, opt_a, 3)
    save_training_state(tmp_path / "c.safetensors", a, opt_a, torch.zeros(64, dtype=torch.long), 3, {})
    b = SAE(cfg)
    opt_b = make_optimizer(b, 1e-2)
    assert load_training_state(tmp_path / "c.safetensors", b, opt_b)[0] == 3
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_b.state[pb][key].stride() == pb.stride(), (name, key)
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), (name, key)


def test_resumed_train_log_is_written_like_an_uninterrupted_one(full_run, tmp_path):
    """The log of a resumed run is the same file as the uninterrupted run's (integer steps stay integers)."""
    a, _ = full_run
    with pytest.raises(RuntimeError):
        train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data(), fail_after=17), tmp_path, progress=False)
    train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data()), tmp_path, progress=False)
    with open(tmp_path / "train_log.csv") as f:
        for r in csv.DictReader(f):
            int(r["step"]), int(r["tokens"])  # "1.0" would fail here
    assert (tmp_path / "train_log.csv").read_text() == (a / "train_log.csv").read_text()


def test_rerun_of_finished_training_changes_nothing(full_run, tmp_path):
    a, _ = full_run
    src = MemTokens(_data())
    before = load_file(str(a / "model.safetensors"))
    train_sae(SAE_CFG, TRAIN_CFG, src, a, progress=False)
    assert src.produced == 0
    after = load_file(str(a / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _log_steps(a) == list(range(1, 41))


@pytest.mark.parametrize("change", [
    ("sae", dict(l1_coeff=0.1)),          # same shapes, other hyper-parameter
    ("sae", dict(d_sae=32)),              # other shapes
    ("train", dict(lr=1e-3)),
    ("train", dict(batch_tokens=32)),
])
def test_checkpoint_of_another_configuration_is_refused(tmp_path, change):
    src = MemTokens(_data(), fail_after=9)
    with pytest.raises(RuntimeError):
        train_sae(SAE_CFG, TRAIN_CFG, src, tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    which, kw = change
    sae_cfg = replace(SAE_CFG, **kw) if which == "sae" else SAE_CFG
    train_cfg = replace(TRAIN_CFG, **kw) if which == "train" else TRAIN_CFG
    with pytest.raises(PatchSAEError) as exc:
        train_sae(sae_cfg, train_cfg, MemTokens(_data()), tmp_path, progress=False)
    assert "checkpoint" in str(exc.value)
    assert ckpt.read_bytes() == before  # the refused run did not touch it
    assert not (tmp_path / "model.safetensors").exists()


def test_nan_in_data_raises_with_step_and_keeps_checkpoint(tmp_path):
    nan_step = 10  # checkpoint at 7 is written first
    with pytest.raises(PatchSAEError) as exc:
        train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data(), nan_at_step=nan_step), tmp_path, progress=False)
    msg = str(exc.value)
    assert f"step {nan_step}" in msg
    assert "\n" not in msg
    sae = SAE(SAE_CFG)
    step, since_fired, info = load_training_state(tmp_path / "checkpoint.safetensors", sae,
                                                  torch.optim.Adam(sae.parameters()))
    assert step == 7
    assert since_fired.shape == (64,)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    assert not (tmp_path / "model.safetensors").exists()
    assert _tmp_files(tmp_path) == []


# ---- load_sae validation ------------------------------------------------------------------------------------

def _saved(tmp_path, d_model=16, d_sae=64):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=d_model, d_sae=d_sae))
    save_sae(tmp_path, sae, {"tokens_trained": 123})
    return sae


def test_save_load_roundtrip(tmp_path):
    sae = _saved(tmp_path)
    with torch.no_grad():
        sae.input_scale.fill_(0.37)
    save_sae(tmp_path, sae, {"tokens_trained": 123})
    loaded, meta = load_sae(tmp_path, d_model=16)
    assert meta["tokens_trained"] == 123 and loaded.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert _tmp_files(tmp_path) == []


def test_load_refuses_other_width_naming_both(tmp_path):
    _saved(tmp_path)
    with pytest.raises(PatchSAEError) as exc:
        load_sae(tmp_path, d_model=32)
    assert "16" in str(exc.value) and "32" in str(exc.value)


def test_load_refuses_tensors_not_matching_config(tmp_path):
    _saved(tmp_path)
    cfg_file = tmp_path / "config.json"
    meta = json.loads(cfg_file.read_text())
    meta["sae"]["d_sae"] = 128
    cfg_file.write_text(json.dumps(meta))
    with pytest.raises(PatchSAEError) as exc:
        load_sae(tmp_path, d_model=16)
    assert "model.safetensors" in str(exc.value)


def test_load_refuses_missing_or_extra_tensor(tmp_path):
    _saved(tmp_path)
    w = tmp_path / "model.safetensors"
    state = load_file(str(w))
    del state["b_enc"]
    state["surprise"] = torch.zeros(3)
    save_file(state, str(w))
    with pytest.raises(PatchSAEError):
        load_sae(tmp_path)


@pytest.mark.parametrize("content", [b"this is not a safetensors file", b"", "truncate"])
def test_load_refuses_garbage_weights(tmp_path, content):
    _saved(tmp_path)
    w = tmp_path / "model.safetensors"
    if content == "truncate":
        content = w.read_bytes()[: w.stat().st_size // 2]
    w.write_bytes(content)
    with pytest.raises(PatchSAEError):
        load_sae(tmp_path, d_model=16)


def test_load_refuses_garbage_config_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(PatchSAEError):
        load_sae(tmp_path, d_model=16)


def test_load_without_files(tmp_path):
    with pytest.raises(PatchSAEError):
        load_sae(tmp_path)


def test_sae_dtype_sets_matmul_precision_only_while_training(tmp_path, monkeypatch):
    """--sae-dtype bf16 trains with bf16 float32-matmuls (torch's "medium" precision) and puts the process-wide
    setting back afterwards, also when training fails; an unknown value is refused in one line."""
    seen = []
    real_step = train_step

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return real_step(*args, **kwargs)

    monkeypatch.setattr("patchsae.sae.train.train_step", spy)
    before = torch.get_float32_matmul_precision()
    cfg = replace(TRAIN_CFG, total_tokens=3 * 64, sae_dtype="bf16")
    train_sae(SAE_CFG, cfg, MemTokens(_data()), tmp_path / "a", progress=False)
    assert seen == ["medium"] * 3 and torch.get_float32_matmul_precision() == before
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["sae_dtype"] == "bf16"
    with pytest.raises(RuntimeError):
        train_sae(SAE_CFG, cfg, MemTokens(_data(), fail_after=1), tmp_path / "b", progress=False)
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(PatchSAEError, match="unknown SAE matmul dtype 'fp8'"):
        replace(TRAIN_CFG, sae_dtype="fp8")


def test_checkpoint_from_before_sae_dtype_existed_resumes(tmp_path):
    """A checkpoint whose saved training settings lack a later-added key (sae_dtype) resumes with its default."""
    from safetensors import safe_open

    with pytest.raises(RuntimeError):
        train_sae(SAE_CFG, TRAIN_CFG, MemTokens(_data(), fail_after=10), tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["info"])
    del info["train"]["sae_dtype"]
    save_file(tensors, str(ckpt), metadata={**meta, "info": json.dumps(info)})
    source = MemTokens(_data())
    train_sae(SAE_CFG, TRAIN_CFG, source, tmp_path, progress=False)
    assert source.produced == 40 - 7
