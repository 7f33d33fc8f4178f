"""The reference objective's training step (SAEConfig(objective="reference")) as ratios, run side by side in
one process on the same activations and weights:

  - ours, reference objective vs ours, scaled objective: the per-token weights should cost next to nothing,
    on the sparse path (a trained SAE's L0 of 149) and on the dense one (at initialisation);
  - ours, reference objective vs the same loss written as plain autograd (the formula of
    tests/test_reference_objective.py), same optimiser and decoder constraint.

Sizes and repetitions as in bench.py (BENCH_D_SAE, BENCH_TOKENS, BENCH_REPS; ViT-B/16 dims by default).
Run: PYTHONPATH=src python benchmarks/reference_objective.py
"""

from __future__ import annotations

from dataclasses import replace

import torch

from bench import D_MODEL, D_SAE, L0_TRAINED, LR, REPS, TOKENS, activations, interleaved_best, ratio, row
from patchsae.sae.model import SAE, SAEConfig
from patchsae.sae.train import make_optimizer, train_step


def make_sae(objective: str, x: torch.Tensor, l0: int | None) -> SAE:
    """Weights shared by all contenders: a reference-objective SAE at initialisation, b_enc lowered so that
    about l0 latents fire per token (None: as initialised). Both objectives get the same input (scale 1)."""
    torch.manual_seed(0)
    ref = SAE(SAEConfig(d_model=D_MODEL, d_sae=D_SAE, objective="reference", l1_coeff=8e-5))
    ref.init_from_sample(x[:1024])
    with torch.no_grad():
        if l0:
            ref.b_enc.fill_(-ref.pre_acts(x).topk(l0, dim=-1).values[:, -1].median().item())
    sae = SAE(replace(ref.cfg, objective=objective))
    sae.load_state_dict(ref.state_dict())
    return sae


def our_step(sae: SAE, x: torch.Tensor):
    opt, since = make_optimizer(sae, LR), torch.zeros(D_SAE, dtype=torch.long)
    return lambda: train_step(sae, opt, x, since)


def autograd_step(sae: SAE, x: torch.Tensor):
    """The reference loss by plain autograd, then the same Adam step and decoder constraint as train_step."""
    opt = make_optimizer(sae, LR)

    def step():
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        err = f @ sae.W_dec + sae.b_dec - x
        loss = (err.pow(2) / x.norm(dim=-1, keepdim=True)).mean() + sae.cfg.l1_coeff * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grads()
        opt.step()
        sae.normalize_decoder()
    return step


def main() -> None:
    print(f"reference objective, SAE step, {D_MODEL} -> {D_SAE:,}, {TOKENS:,} tokens, "
          f"threads={torch.get_num_threads()}", flush=True)
    x = activations()
    for regime, l0 in (("trained", L0_TRAINED), ("init", None)):
        fns = {"scaled": our_step(make_sae("scaled", x, l0), x),
               "reference": our_step(make_sae("reference", x, l0), x),
               "autograd": autograd_step(make_sae("reference", x, l0), x)}
        t = interleaved_best(fns, REPS)
        print(f"  {regime}: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()), flush=True)
        where = f"{regime}, {'L0 = %d, sparse path' % L0_TRAINED if l0 else 'dense path'}"
        row("ref", f"reference vs scaled objective ({where}; target ~1x)", ratio(t["scaled"], t["reference"]))
        row("ref", f"reference: ours vs plain autograd ({where}; target > 1x)", ratio(t["autograd"], t["reference"]))


if __name__ == "__main__":
    main()
