"""Check issue 18's must-hold numbers on a run, independently of `analyze`'s accumulator and of
`analysis/kinds.py`: encode every image of the analysed split with the run's SAE in a plain loop, count per
latent the images it fires on, its activation mass per token position and its class-level counts (tokens
> tau), then judge the first 50 latents `GET /api/latents` lists (the explorer's default) by the issue's
definitions: dense = fires on more than 50 % of the images, positional = more than 50 % of its activation mass
at one token position, selective = 50 % or more of its class-level count in one class.

    PYTHONPATH=src python scripts/check_concept_quality.py --run runs/quickstart
"""

from __future__ import annotations

import argparse
import json

import torch


def independent_stats(run_path: str, tau: float, batch: int = 250) -> dict[str, torch.Tensor]:
    from patchsae.data.base import iter_batches
    from patchsae.runs import Run
    from patchsae.runs.artefacts import open_run, open_run_dataset

    run = Run(run_path)
    cfg, model, sae, layer = open_run(run)
    ds = open_run_dataset(cfg, None, cfg.eval_split)
    rows_T = model.layout().image_token_mask()
    S, C = sae.cfg.d_sae, len(ds.class_names)
    fired_S, mass_TS = torch.zeros(S, dtype=torch.long), torch.zeros(int(rows_T.sum()), S, dtype=torch.float64)
    counts_CS, n = torch.zeros(C, S, dtype=torch.long), 0
    with torch.no_grad():
        for pixels, labels, _ in iter_batches(ds, model.preprocess, batch):
            f_BTS = sae.encode(model.block_output(pixels, layer)[:, rows_T])
            fired_S += (f_BTS.amax(1) > 0).sum(0)
            mass_TS += f_BTS.double().sum(0)
            for y in labels.unique():
                counts_CS[y] += (f_BTS[labels == y] > tau).sum((0, 1))
            n += len(labels)
    return {"image_frac_S": fired_S / n, "pos_share_S": mass_TS.max(0).values / mass_TS.sum(0).clamp_min(1e-30),
            "class_share_S": counts_CS.max(0).values / counts_CS.sum(0).clamp_min(1), "n": n, "alive_S": fired_S > 0}


def api_first(run_path: str, limit: int) -> list[int]:
    from fastapi.testclient import TestClient

    from patchsae.explorer.server import create_app
    from patchsae.explorer.session import Explorer
    from patchsae.runs import Run

    with TestClient(create_app(Explorer(Run(run_path)))) as client:
        return [r["latent"] for r in client.get("/api/latents", params={"limit": limit}).json()["latents"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--first", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = independent_stats(args.run, args.tau)
    dense_S, pos_S, sel_S = s["image_frac_S"] > 0.5, s["pos_share_S"] > 0.5, s["class_share_S"] >= 0.5
    first = api_first(args.run, args.first)
    out = {"images": s["n"], "alive": int(s["alive_S"].sum()),
           "population": {"dense": int(dense_S.sum()), "positional": int((pos_S & s["alive_S"]).sum()),
                          "selective (>= 50 % in one class)": int((sel_S & s["alive_S"]).sum())},
           f"first {len(first)} of GET /api/latents": {"dense": int(dense_S[first].sum()),
                                                       "positional": int(pos_S[first].sum()),
                                                       "selective": int(sel_S[first].sum())}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
