"""Foreign SAE formats at ViT-B/16 size (768 -> 49,152, random weights): what crossing the border costs, as
ratios against the plain operation on the same tensors in this process.

  1. import of the reference checkpoint through our restricted unpickler vs torch.load(weights_only=False)
     of the same file (which would run any code in it);
  2. SAELens export (scale folded, cfg + sidecar) vs our own save_sae of the same SAE;
  3. SAELens import (read_sae) vs safetensors.load_file of the exported weights plus one pass over them
     (load_file maps the file lazily; the import reads every byte once, to refuse NaN or infinite weights);
  4. SAELens import vs sae_lens.SAE.load_from_disk of the same folder, when sae-lens is installed.

BENCH_D_SAE overrides the width (smaller values only for trying changes quickly); BENCH_REPS the repetitions.
Run: PYTHONPATH=src python benchmarks/formats.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from bench import interleaved_best  # noqa: E402
from helpers import reference_config_class  # noqa: E402

from patchsae.sae.checkpoint import save_sae  # noqa: E402
from patchsae.sae.formats import read_sae, write_sae  # noqa: E402
from patchsae.sae.model import SAE, SAEConfig  # noqa: E402

D_MODEL = 768
D_SAE = int(os.environ.get("BENCH_D_SAE", 49_152))
REPS = int(os.environ.get("BENCH_REPS", "2"))


class _Setter:
    """monkeypatch.setitem's interface, for the test helper run from a script."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


def _reference_file(path: Path, sae: SAE) -> OrderedDict:
    """The released checkpoint's layout: its config class pickled under src.sae_training.config (the tests'
    helper registers it, so torch.load without weights_only can rebuild it too) beside the state dict; returns
    the state dict."""
    make_cfg = reference_config_class(_Setter, D_MODEL)
    state = OrderedDict((k, getattr(sae, k).detach().clone()) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    torch.save({"cfg": make_cfg(expansion_factor=D_SAE // D_MODEL), "state_dict": state}, path)
    return state


def main() -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    sae = SAE(SAEConfig(D_MODEL, D_SAE, "relu")).eval()
    with torch.no_grad():
        sae.input_scale.fill_(0.37)
    print(f"formats at {D_MODEL} -> {D_SAE}, best of {REPS}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = _reference_file(tmp / "out.pt", sae)
        got = read_sae(tmp / "out.pt")
        x_ND = torch.randn(64, D_MODEL)
        f_want = torch.relu((x_ND - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
        err = ((got.sae.encode(x_ND) - f_want).norm() / f_want.norm()).item()
        print(f"  reference checkpoint read back: model {got.model}, block {got.layer}, tokens {got.tokens}, "
              f"codes vs the reference formula: relative error {err:.1e}")
        t = interleaved_best({"ours": lambda: read_sae(tmp / "out.pt"),
                              "torch.load": lambda: torch.load(tmp / "out.pt", weights_only=False)}, REPS)
        print(f"  1. reference import, restricted unpickler / torch.load      {t['ours'] / t['torch.load']:.2f}x"
              f"  ({t['ours']:.2f} s)")

        def export():
            (tmp / "lens").mkdir(exist_ok=True)
            write_sae(sae, tmp / "lens", "saelens")

        t = interleaved_best({"export": export, "save_sae": lambda: save_sae(tmp / "own", sae)}, REPS)
        print(f"  2. SAELens export / own save_sae                             {t['export'] / t['save_sae']:.2f}x"
              f"  ({t['export']:.2f} s)")
        weights = str(tmp / "lens" / "sae_weights.safetensors")
        t = interleaved_best({"import": lambda: read_sae(tmp / "lens"),
                              "load_file": lambda: [v.sum() for v in load_file(weights).values()]}, REPS)
        print(f"  3. SAELens import / safetensors load_file + one pass         {t['import'] / t['load_file']:.2f}x"
              f"  ({t['import']:.2f} s)")
        try:
            from sae_lens import SAE as LensSAE
        except ImportError:
            print("  4. skipped: sae-lens is not installed (pip install -e .[bench])")
            return
        t = interleaved_best({"import": lambda: read_sae(tmp / "lens"),
                              "sae_lens": lambda: LensSAE.load_from_disk(str(tmp / "lens"))}, REPS)
        print(f"  4. SAELens import / sae_lens.SAE.load_from_disk              {t['import'] / t['sae_lens']:.2f}x"
              f"  ({t['import']:.2f} s)")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    main()
