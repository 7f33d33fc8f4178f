"""Sweep SAE settings on the embedded model to choose the quickstart defaults (recorded in docs/method.md).

    .venv/bin/python scripts/sweep_embedded.py --run runs/sweep --l1 1e-3 3e-3 1e-2 --epochs 0.5

Caches the training split once in --run, then trains one SAE per setting in --run/sweep_<arch>_<value> and
evaluates it on the first --eval-images test images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from patchsae.stages import cache, evaluate, train
from patchsae.runs import EMBEDDED_DEFAULTS, Run, RunConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--l1", type=float, nargs="*", default=[])
    ap.add_argument("--topk", type=int, nargs="*", default=[])
    ap.add_argument("--expansion", type=int, default=EMBEDDED_DEFAULTS["expansion"])
    ap.add_argument("--epochs", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=EMBEDDED_DEFAULTS.get("lr", 4e-4))
    ap.add_argument("--batch-tokens", type=int, default=EMBEDDED_DEFAULTS.get("batch_tokens", 4096))
    ap.add_argument("--warmup-steps", type=int, default=EMBEDDED_DEFAULTS["warmup_steps"])
    ap.add_argument("--eval-images", type=int, default=2000)
    args = ap.parse_args()

    base = replace(RunConfig(**EMBEDDED_DEFAULTS), epochs=args.epochs, expansion=args.expansion,
                   max_eval_images=args.eval_images, lr=args.lr, batch_tokens=args.batch_tokens,
                   warmup_steps=args.warmup_steps)
    root = Run(args.run)
    root.init(base, {})
    cache.run(root)
    settings = [("relu", dict(arch="relu", l1_coeff=v)) for v in args.l1]
    settings += [("topk", dict(arch="topk", k=v)) for v in args.topk]
    rows = []
    for arch, over in settings:
        value = over.get("l1_coeff", over.get("k"))
        sub = Run(root.path / f"sweep_{arch}_{value:g}_x{args.expansion}_lr{args.lr:g}_b{args.batch_tokens}"
                  f"_e{args.epochs:g}")
        sub.init(replace(base, **over), {})
        (sub.path / "cache").mkdir(exist_ok=True)
        link = sub.cache_dir(base.train_split)
        if not link.exists():
            link.symlink_to(root.cache_dir(base.train_split).resolve())
        train.run(sub)
        m = evaluate.run(sub).to_json()
        row = {"arch": arch, "value": value, "expansion": args.expansion, "lr": args.lr,
               "batch_tokens": args.batch_tokens, "epochs": args.epochs, **{k: m[k] for k in (
            "explained_variance", "l0_per_token", "dead_fraction", "dense_fraction", "zero_shot_accuracy",
            "spliced_accuracy")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| arch | lambda / k | expansion | lr | batch | epochs | EV | L0/token | dead | dense | zero-shot | spliced |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['value']:g} | {r['expansion']} | {r['lr']:g} | {r['batch_tokens']} | "
              f"{r['epochs']:g} | {r['explained_variance']:.3f} | {r['l0_per_token']:.1f} | "
              f"{r['dead_fraction']:.3f} | {r['dense_fraction']:.3f} | {r['zero_shot_accuracy']:.3f} | "
              f"{r['spliced_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
