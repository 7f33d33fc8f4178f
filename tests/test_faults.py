"""Faults (issue 17): a full disk or an I/O error at each write of the cache, SAE checkpoints and MaPLe prompts
(injected by patching the write path, `patchsae.utils.atomic_path`, in every module that holds it), and the two
defects the rest of the suite would not notice (tau counted with >=; the explorer's figure endpoint serving
files other than the listed PNGs).

After a failed write: the error is one PatchSAEError line naming the file; the previous complete state is still
readable and unchanged; no temporary or half-written file is left to be taken as complete; and a rerun without
the fault gives exactly what an uninterrupted run gives.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsae import PatchSAEError
from patchsae.activations.cache import ActivationCache, build_cache
from patchsae.analysis.latents import LatentAccumulator
from patchsae.data.base import FirstN
from patchsae.data.digits import Digits
from patchsae.models.load import load_model
from patchsae.sae.checkpoint import load_sae, load_training_state, save_sae, save_training_state
from patchsae.sae.model import SAE, SAEConfig
from killing import WriteFault

pytestmark = pytest.mark.usefixtures("one_thread")

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


def one_line_naming(exc: PatchSAEError, paths: list[Path]) -> None:
    msg = str(exc)
    assert "\n" not in msg and msg.startswith("cannot write "), msg
    assert any(str(p) in msg for p in paths), msg


# ---- the SAE checkpoint ---------------------------------------------------------------------------------------

CFG = SAEConfig(d_model=8, d_sae=16)


def _sae(seed):
    torch.manual_seed(seed)
    return SAE(CFG)


@pytest.mark.parametrize("fault,where", [("ENOSPC", "write"), ("EIO", "write"), ("EIO", "rename")])
def test_sae_save_fault_keeps_previous_sae(tmp_path, monkeypatch, fault, where):
    """Each of save_sae's two writes fails in turn over a folder holding an earlier SAE: that SAE still loads
    unchanged (a new weights file beside the old config is refused, not mixed), and saving again works."""
    old, new = _sae(0), _sae(1)
    save_sae(tmp_path, old)
    before = snapshot(tmp_path)
    probe = WriteFault(monkeypatch, None)
    save_sae(tmp_path.parent / f"{tmp_path.name}-probe", new)
    n_writes = probe.calls
    monkeypatch.undo()
    assert n_writes == 2
    for k in range(n_writes):
        with monkeypatch.context() as m:
            f = WriteFault(m, k, fault, where)
            with pytest.raises(PatchSAEError) as err:
                save_sae(tmp_path, new)
            one_line_naming(err.value, [f.paths[k]])
        no_temporaries(tmp_path)
        try:
            loaded, _ = load_sae(tmp_path)
            assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
        except PatchSAEError as exc:  # the new weights landed, the config did not: refused as a pair
            assert k == 1 and "not the file its config.json was saved with" in str(exc)
        save_sae(tmp_path, old)
        assert snapshot(tmp_path) == before


def test_training_checkpoint_fault_keeps_previous_state(tmp_path, monkeypatch):
    sae = _sae(0)
    opt = torch.optim.Adam(sae.parameters())
    save_training_state(tmp_path / "c.safetensors", sae, opt, torch.zeros(16, dtype=torch.long), 5, {})
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:
        WriteFault(m, 0)
        with pytest.raises(PatchSAEError) as err:
            save_training_state(tmp_path / "c.safetensors", _sae(1), opt, torch.ones(16, dtype=torch.long), 9, {})
        one_line_naming(err.value, [tmp_path / "c.safetensors"])
    assert snapshot(tmp_path) == before
    step, _, _ = load_training_state(tmp_path / "c.safetensors", _sae(2), torch.optim.Adam(_sae(2).parameters()))
    assert step == 5


# ---- the activation cache -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


def _build(tiny, out):
    return build_cache(tiny, FirstN(Digits("train"), 10), -2, out, batch_size=4, shard_images=4, progress=False)


@pytest.mark.parametrize("fault", ["ENOSPC", "EIO"])
def test_cache_fault_at_every_write(tiny, tmp_path, monkeypatch, fault):
    """A fault at each write of an extraction (plan, shards, indices, done-records, manifest): one line naming
    the file, no manifest unless complete, no temporaries; the rerun finishes and equals an uninterrupted one."""
    ref_dir = tmp_path / "ref"
    probe = WriteFault(monkeypatch, None)
    _build(tiny, ref_dir)
    n_writes = probe.calls
    monkeypatch.undo()
    ref = snapshot(ref_dir)
    assert n_writes >= 10 and "manifest.json" in ref
    for k in range(n_writes):
        out = tmp_path / f"run{k}"
        with monkeypatch.context() as m:
            f = WriteFault(m, k, fault)
            with pytest.raises(PatchSAEError) as err:
                _build(tiny, out)
            one_line_naming(err.value, [f.paths[k]])
        no_temporaries(out)
        assert not (out / "manifest.json").exists()
        with pytest.raises(PatchSAEError, match="no activation cache"):
            ActivationCache(out)
        _build(tiny, out)
        assert snapshot(out) == ref, f"rerun after a fault at write {k} differs"


# ---- MaPLe prompts --------------------------------------------------------------------------------------------

def test_prompts_fault_keeps_previous_prompts(tiny, tmp_path, monkeypatch):
    from patchsae.models.maple import MapleConfig, build_maple, load_adapted, save_prompts

    old, new = build_maple(tiny, MapleConfig(depth=2), seed=0), build_maple(tiny, MapleConfig(depth=2), seed=1)
    save_prompts(tmp_path, old)
    before = snapshot(tmp_path)
    for k in range(2):
        with monkeypatch.context() as m:
            f = WriteFault(m, k)
            with pytest.raises(PatchSAEError) as err:
                save_prompts(tmp_path, new)
            one_line_naming(err.value, [f.paths[k]])
        no_temporaries(tmp_path)
        try:
            got = load_adapted(tiny, tmp_path)
            assert torch.equal(got.prompts.ctx, old.prompts.ctx)
            assert torch.equal(got.prompts.compound_prompts_text[0], old.prompts.compound_prompts_text[0])
        except PatchSAEError as exc:
            assert k == 1 and "not the file" in str(exc)
        save_prompts(tmp_path, old)
        assert snapshot(tmp_path) == before


# ---- class-level counts: strictly above tau ------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.0, 0.2, 1.5])
def test_class_counts_are_strictly_above_tau(tau):
    """Activations exactly equal to tau are not counted (with tau = 0 a `>=` would count every zero), through
    the accumulator `analyze` uses, whose rule (`latents.add_class_counts`) every other count shares; checked
    against a count written out element by element (in float32, the activations' precision: 0.2 means the
    float32 nearest 0.2)."""
    g = torch.Generator().manual_seed(0)
    f_BTS = torch.relu(torch.randn(6, 5, 7, generator=g))
    f_BTS[f_BTS < 0.3] = 0.0
    f_BTS[0, :3, :] = tau  # many values exactly at the threshold
    f_BTS[1, 2, 4] = float(np.nextafter(np.float32(tau), np.float32(np.inf)))  # the smallest value above it
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    acc = LatentAccumulator(d_sae=7, n_classes=3, n_tokens=5, k=2, tau=tau)
    acc.update(f_BTS, labels, torch.arange(6), torch.tensor([False] + [True] * 4))
    expected = torch.zeros(3, 7, dtype=torch.long)
    for b in range(6):
        for t in range(5):
            for s in range(7):
                if np.float32(f_BTS[b, t, s].item()) > np.float32(tau):
                    expected[labels[b], s] += 1
    assert torch.equal(acc.result().class_counts_CS, expected)
    assert acc.result().class_counts_CS[1, 4] >= 1  # the value just above tau is counted


# ---- the explorer serves only the listed PNG figures ----------------------------------------------------------

@pytest.fixture(scope="module")
def explorer_run(tiny_clip_dir, tmp_path_factory):
    from patchsae.runs import Run, RunConfig
    from patchsae.stages.analyze import AnalyzeOptions
    from patchsae.stages.analyze import run as stage_analyze

    run = Run(tmp_path_factory.mktemp("figures") / "run")
    run.init(RunConfig(model=str(tiny_clip_dir)), {})
    save_sae(run.sae_dir, _sae_for(32))
    stage_analyze(run, AnalyzeOptions(max_images=20, batch_size=20, k=3, n_grid=2), progress=False)
    return run


def _sae_for(d_model):
    torch.manual_seed(0)
    return SAE(SAEConfig(d_model=d_model, d_sae=32))


def test_figure_endpoint_serves_only_listed_pngs(explorer_run):
    """Files placed in figures/ beside the stage's PNGs: a text file, a .png link to the run's config, a .png
    that is not a PNG, a folder named .png. None is listed or served (404, one JSON line), the real figures are,
    and the static report copies only the listed ones."""
    from fastapi.testclient import TestClient

    from patchsae.explorer.report import write_report
    from patchsae.explorer.server import create_app
    from patchsae.explorer.session import Explorer

    figs = explorer_run.figures_dir
    real = sorted(p.name for p in figs.glob("*.png"))
    assert "latent_scatter.png" in real
    (figs / "notes.txt").write_text("private notes")
    (figs / "config.png").symlink_to(explorer_run.config_file)
    (figs / "page.png").write_text("<html><script>alert(1)</script></html>")
    (figs / "folder.png").mkdir()
    client = TestClient(create_app(Explorer(explorer_run)))
    assert client.get("/api/info").json()["figures"] == real
    for name in real:
        r = client.get(f"/api/figures/{name}")
        assert r.status_code == 200 and r.content == (figs / name).read_bytes()
        assert r.headers["content-type"] == "image/png"
    for name in ("notes.txt", "config.png", "page.png", "folder.png"):
        r = client.get(f"/api/figures/{name}")
        assert r.status_code == 404 and list(r.json()) == ["error"] and "\n" not in r.text, name
    site = explorer_run.path / "site"
    write_report(Explorer(explorer_run), site, top=2, class_top=1)
    assert sorted(p.name for p in (site / "figures").iterdir()) == real


# ---- error lines never advise an unsafe action ----------------------------------------------------------------

@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "exec"), ("subprocess", "call")])
def test_malicious_checkpoint_error_gives_no_unsafe_advice(tiny, tmp_path, capsys, module, name):
    """A .pt / .pth.tar whose unpickling would run a command: the CLI prints one line that names the file and
    what it would call, never torch's advice to re-run with weights_only=False; the command never runs."""
    from fuzzing import payload_object, torch_bytes

    from patchsae import cli
    from patchsae.models.maple import load_adapted
    from patchsae.utils import UNSAFE_ADVICE

    mark = tmp_path / "ran"
    payload = {"state_dict": {"prompt_learner.ctx": torch.zeros(2, 32)},
               "scheduler": payload_object(module, name, mark)}
    for path in (tmp_path / "clip.pt", tmp_path / "model.pth.tar-2"):
        path.write_bytes(torch_bytes(payload, legacy=path.suffix == ".pt"))
    assert cli.main(["cache", "--run", str(tmp_path / "run"), "--model", str(tmp_path / "clip.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("patchsae: error:") and "clip.pt" in err
    with pytest.raises(PatchSAEError) as exc:
        load_adapted(tiny, tmp_path / "model.pth.tar-2")
    for msg in (err, str(exc.value)):
        assert not any(a in msg for a in UNSAFE_ADVICE) and "weights_only" not in msg, msg
    assert not mark.exists()


# ---- preprocessing work is bounded by the crop, not by the image's aspect ratio -----------------------------

def test_preprocess_of_an_extreme_strip_stays_small(monkeypatch):
    """A 1 x 200,000 PNG is 1 KB; resizing its short side to 28 px before cropping would build a 28 x 5.6 M
    image (470 MB). Every image the preprocessing makes is at most the crop, and a constant strip still gives
    the constant (value / 255 - mean) / std everywhere."""
    from PIL import Image

    from patchsae.models.clip import CLIP_MEAN, CLIP_STD, Preprocess

    made = []
    real = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        made.append(size)
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    for size in ((1, 200_000), (200_000, 3)):
        x = Preprocess(28)([Image.new("L", size, 77)])
        assert x.shape == (1, 3, 28, 28) and all(w * h <= 28 * 28 for w, h in made), made
        want = (77 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(x[0], want[:, None, None].expand(3, 28, 28), atol=1e-5)


def test_report_disk_full_keeps_previous_site(explorer_run, monkeypatch):
    """The static report writes its pages straight into a temporary folder and swaps it in at the end: a full
    disk half-way through is one line naming the site, the previous site is unchanged, nothing temporary stays."""
    import pathlib

    from patchsae.explorer.report import write_report
    from patchsae.explorer.session import Explorer

    site = explorer_run.path / "site-faults"
    ex = Explorer(explorer_run)
    write_report(ex, site, top=2, class_top=1)
    before = snapshot(site)
    real, calls = pathlib.Path.write_text, []

    def full(self, *args, **kwargs):
        calls.append(self)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(PatchSAEError) as err:
        write_report(ex, site, top=2, class_top=1)
    one_line_naming(err.value, [site])
    monkeypatch.undo()
    assert snapshot(site) == before
    assert sorted(p.name for p in site.parent.iterdir() if p.name.startswith(".site-faults")) == []
