"""`patchsae import` / `export`, `train --log` and `--config FILE` on a tiny random CLIP run: the SAELens round trip
gives the original run's evaluate numbers, foreign SAEs become runs every stage works on, and bad input is one
line."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from helpers import reference_config_class

from patchsae import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(make_tiny_run):
    return make_tiny_run("interop")


def _metrics(run) -> dict:
    return json.loads((run / "eval" / "metrics.json").read_text())


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("patchsae: error: ") and "\n" not in err, err
    return err


def test_saelens_round_trip_gives_the_runs_evaluate_numbers(tiny_run, tmp_path):
    from sae_lens import SAE as LensSAE

    out, new = tmp_path / "lens", tmp_path / "imported"
    assert cli.main(["export", "--run", str(tiny_run), "--format", "saelens", "--out", str(out)]) == 0
    assert LensSAE.load_from_disk(str(out)).cfg.d_sae == json.loads((tiny_run / "sae" / "config.json").read_text()
                                                                    )["sae"]["d_sae"]
    assert cli.main(["import", "--sae", str(out), "--run", str(new)]) == 0
    assert cli.main(["evaluate", "--run", str(new)]) == 0
    before, after = _metrics(tiny_run), _metrics(new)
    assert after.pop("tokens_trained") is None
    before.pop("tokens_trained")
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k.endswith("accuracy") or isinstance(v, (int, str)):
            assert after[k] == v, k
        else:
            assert after[k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    old_cfg, new_cfg = (json.loads((r / "config.json").read_text()) for r in (tiny_run, new))
    assert {k: v for k, v in new_cfg.items() if k != "layer"} == {k: v for k, v in old_cfg.items() if k != "layer"}
    assert cli.main(["analyze", "--run", str(new), "--max-images", "20"]) == 0  # later stages work on it
    from patchsae.explorer.session import Explorer
    from patchsae.runs import Run

    assert Explorer(Run(new)).info()["sae_origin"] == {"format": "saelens", "source": str(out)}


def test_export_refusals_are_one_line(tiny_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["export", "--run", str(tiny_run), "--format", "saelens", "--out", str(out)]) == 2
    assert "--force" in _error(capsys) and (out / "keep.txt").read_text() == "mine"
    assert cli.main(["export", "--run", str(tiny_run), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 2
    assert "only TopK" in _error(capsys) and not (tmp_path / "sp").exists()
    assert cli.main(["export", "--run", str(tiny_run), "--format", "saelens", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "sae_weights.safetensors").exists()


def test_hub_export_has_metrics_analysis_and_a_card(tiny_run, tmp_path):
    from huggingface_hub import ModelCard

    assert cli.main(["analyze", "--run", str(tiny_run), "--max-images", "20"]) == 0
    out = tmp_path / "hub"
    assert cli.main(["export", "--run", str(tiny_run), "--format", "hub", "--out", str(out),
                     "--repo-id", "me/tiny-sae"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == _metrics(tiny_run)
    assert (out / "analysis" / "stats.safetensors").read_bytes() == \
        (tiny_run / "analysis" / "stats.safetensors").read_bytes()
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "patchsae" and card.data.datasets == ["fashion-mnist"]
    assert "patchsae import --sae hf:me/tiny-sae" in card.text
    assert cli.main(["import", "--sae", str(out), "--run", str(tmp_path / "from-hub")]) == 0


def test_import_mismatches_are_one_line(tiny_run, tiny_clip_dir, tmp_path, capsys):
    from patchsae.sae.formats import write_sae
    from patchsae.sae.model import SAE, SAEConfig

    wide = tmp_path / "wide"
    wide.mkdir()
    write_sae(SAE(SAEConfig(24, 96)), wide, "saelens", model=str(tiny_clip_dir), layer=1)
    assert cli.main(["import", "--sae", str(wide), "--run", str(tmp_path / "a")]) == 2
    assert "width 24, but the model's blocks have width 32" in _error(capsys)
    deep = tmp_path / "deep"
    deep.mkdir()
    write_sae(SAE(SAEConfig(32, 64)), deep, "saelens", model=str(tiny_clip_dir), layer=7)
    assert cli.main(["import", "--sae", str(deep), "--run", str(tmp_path / "b")]) == 2
    assert "block 7 (from its file) does not exist in a model with 3 blocks" in _error(capsys)
    assert cli.main(["import", "--sae", str(deep), "--run", str(tiny_run)]) == 2
    assert "already holds results" in _error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reference_checkpoint_becomes_a_run(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """The reference's own checkpoint layout (a pickled config class we do not have) imports, names its model
    and block, and the run evaluates; training over it is refused."""
    make_cfg = reference_config_class(monkeypatch, 32)
    torch.manual_seed(0)
    state = OrderedDict(W_enc=torch.randn(32, 128) * 0.1, b_enc=torch.zeros(128), W_dec=torch.randn(128, 32) * 0.1,
                        b_dec=torch.zeros(32))
    torch.save({"cfg": make_cfg(model_name=str(tiny_clip_dir), block_layer=-2, expansion_factor=4),
                "state_dict": state}, tmp_path / "out.pt")
    run = tmp_path / "ref"
    assert cli.main(["import", "--sae", str(tmp_path / "out.pt"), "--run", str(run), "--max-eval-images",
                     "30"]) == 0
    assert "imported a reference SAE (relu, 32 -> 128)" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"], cfg["layer"], cfg["tokens"], cfg["arch"]) == (str(tiny_clip_dir), -2, "all", "relu")
    assert cli.main(["evaluate", "--run", str(run)]) == 0
    assert _metrics(run)["eval_images"] == 30
    # and on to SAELens: the paper's SAE as a SAELens folder, same codes as the reference's own encoder
    from sae_lens import SAE as LensSAE

    assert cli.main(["export", "--run", str(run), "--format", "saelens", "--out", str(tmp_path / "lens")]) == 0
    x = torch.randn(50, 32)
    want = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    got = LensSAE.load_from_disk(str(tmp_path / "lens")).encode(x).detach()
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
    capsys.readouterr()
    assert cli.main(["train", "--run", str(run)]) == 2
    assert "imported SAE" in _error(capsys)


def test_train_log_tensorboard_read_back(tiny_clip_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "logged"
    assert cli.main(["quickstart", "--run", str(run), "--model", str(tiny_clip_dir), "--max-train-images", "60",
                     "--max-eval-images", "20", "--expansion", "2", "--warmup-steps", "2", "--batch-tokens", "256",
                     "--log", "tensorboard"]) == 0
    acc = EventAccumulator(str(run / "logs")).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/mse", "train/l1", "train/l0", "train/dead_fraction", "train/lr",
            "eval/explained_variance", "eval/spliced_accuracy"} <= tags
    rows = (run / "sae" / "train_log.csv").read_text().splitlines()
    assert len(acc.Scalars("train/loss")) == len(rows) - 1
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert acc.Scalars("train/l0")[-1].value == pytest.approx(float(last["l0"]), rel=1e-5)
    ev = acc.Scalars("eval/explained_variance")[0]
    assert ev.value == pytest.approx(_metrics(run)["explained_variance"], rel=1e-5)
    assert ev.step == acc.Scalars("train/loss")[-1].step


def test_config_file_json_and_toml(tiny_run, tiny_clip_dir, tmp_path, capsys):
    """A run's own config.json repeats the run; the command line overrides the file; TOML tables apply to
    their stage; unknown names, wrong types and bad choices are one line."""
    new = tmp_path / "again"
    assert cli.main(["cache", "--run", str(new), "--config", str(tiny_run / "config.json")]) == 0
    assert json.loads((new / "config.json").read_text()) == json.loads((tiny_run / "config.json").read_text())

    toml = tmp_path / "opts.toml"
    toml.write_text('model = "openai/clip-vit-base-patch16"\nmax_train_images = 40\nlr = 0.01\n'
                    '[train]\narch = "topk"\nk = 4\n[evaluate]\nk = 99\n')
    capsys.readouterr()
    assert cli.main(["train", "--run", str(tmp_path / "t"), "--config", str(toml), "--lr", "0.002",
                     "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out.split("resolved configuration:\n", 1)[1].split("\nbudget:")[0])
    assert (resolved["model"], resolved["max_train_images"], resolved["arch"], resolved["k"], resolved["lr"]) == \
        ("openai/clip-vit-base-patch16", 40, "topk", 4, 0.002)
    # names follow --help: the run's TopK k never becomes analyze's --top-k
    args = cli.build_parser().parse_args(["analyze", "--run", str(tiny_run), "--config", str(tiny_run / "config.json")])
    assert not hasattr(cli.apply_config_file(args), "k")
    toml.write_text("top_k = 3\ngroup = [\"t-shirt\", \"shirt\"]\n")
    args = cli.apply_config_file(cli.build_parser().parse_args(["analyze", "--run", "x", "--config", str(toml)]))
    assert (args.k, args.groups) == (3, ("t-shirt", "shirt"))
    for text, masking in (("masking = false", False), ("no_masking = true", False), ("no-masking = false", True)):
        toml.write_text(text + "\n")
        args = cli.build_parser().parse_args(["compare", "--run", "x", "--adapted", "p", "--config", str(toml)])
        assert cli.apply_config_file(args).masking is masking, text
    for text, msg in (('lerning_rate = 0.1', "unknown option 'lerning_rate'"),
                      ('max_train_images = "many"', "option 'max_train_images'"),
                      ('log = "mlflow"', "is not one of")):
        toml.write_text(text + "\n")
        assert cli.main(["train", "--run", str(tmp_path / "t"), "--config", str(toml), "--dry-run"]) == 2
        assert msg in _error(capsys)
