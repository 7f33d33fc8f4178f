"""`make bench`: speed of the SAE step, of activation extraction and of cached vs on-the-fly training, each as
ratios of implementations run side by side in this one process on the same data and configuration.

  a. SAE training step at ViT-B/16 dims (768 -> 49,152, 4,096 tokens a step), ReLU + L1 and TopK (k = 64):
     ours vs SAELens (StandardTrainingSAE; TopKTrainingSAE with use_sparse_activations off and on, the faster
     one counts, a setting that fails is reported as failed), our TopK vs our ReLU, and our TopK vs the
     encoder-GEMM bound (tokens/s if the step cost only the encoder product at the measured matmul FLOP/s).
  b. Activation extraction on a random-weight ViT-B/16 (224 px, 197 tokens): our early exit after block 11
     and block 8 (of 12, the paper's numbering) vs a full forward with output_hidden_states (best of at least 5
     interleaved rounds).
  c. SAE training on the embedded model from the fp16 cache vs extracting activations on the fly.
  e. Several layers: blocks 11, 8 and 5 of the same ViT-B/16 from one pass (`cache --layers`) vs block 11 alone
     (one forward pass) and vs three separate passes (after checking the outputs bitwise equal); BENCH_LAYERS_BATCH
     images a batch (default 8).
  t. (not in `make bench`; for checking the TopK targets quickly) the encoder GEMM, our TopK step and SAELens's
     TopK steps interleaved in each round, and the TopK kernels vs what they replace.

Each time is the best of BENCH_REPS (2) repetitions after one warm-up, BENCH_STEP_REPS (1) for the SAE steps
of section a; BENCH_THREADS sets torch's threads (default: all cores). Section d (peak memory) is benchmarks/memory.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchsae.sae.model import SAE, SAEConfig
from patchsae.sae.train import make_optimizer, train_step

D_MODEL, K = 768, 64
D_SAE = int(os.environ.get("BENCH_D_SAE", 49_152))  # smaller values only for trying changes quickly
TOKENS = int(os.environ.get("BENCH_TOKENS", 4_096))
REPS = int(os.environ.get("BENCH_REPS", "2"))
STEP_REPS = int(os.environ.get("BENCH_STEP_REPS", "1"))  # section a: a dense 49,152-wide step takes 10-50 s here
ROWS: list[tuple[str, str, str]] = []  # (section, comparison, result)
RESULTS_FILE = Path("runs/bench/results.json")
RESULTS: dict[str, float | None] = {}  # stable key -> the ratio printed in its row (None: a contender failed)


def interleaved_best(fns: dict, reps: int) -> dict:
    """Best time of each function over `reps` rounds that run them in turn, so a slow spell of the machine
    (other processes, frequency changes) hits every contender alike instead of biasing a ratio."""
    for fn in fns.values():
        fn()  # warm-up: first-touch allocations, lazy initialisation
    times = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t)
    return times


def best_time(fn, reps: int = REPS) -> float:
    """Best of `reps` timed calls after one warm-up."""
    return interleaved_best({"fn": fn}, reps)["fn"]


def row(section: str, key: str, what: str, value: float | None, times: bool = True, failed: str = "failed") -> None:
    """One printed ratio, also kept under its stable `key` for runs/bench/results.json."""
    RESULTS[key] = None if value is None else round(value, 4)
    text = failed if value is None else f"{value:.2f}{'x' if times else ''}"
    ROWS.append((section, what, text))
    print(f"  {what:<58} {text}", flush=True)


def write_results(label: str, seconds: float, extra: dict | None = None) -> None:
    """Merge this run's ratios into runs/bench/results.json (benchmarks/gpu.py adds its own keys there), with
    what they were measured under: a key keeps its last measured value."""
    from patchsae.utils import read_json, write_json

    old = read_json(RESULTS_FILE) if RESULTS_FILE.exists() else {}
    meta = {**(extra or {}), "seconds": round(seconds), "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()), "torch": torch.__version__, "d_sae": D_SAE, "tokens": TOKENS,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS_FILE, {"ratios": {**old.get("ratios", {}), **RESULTS},
                              "runs": {**old.get("runs", {}), label: meta}})
    print(f"ratios written to {RESULTS_FILE}")


# ---- a. SAE step ---------------------------------------------------------------------------------------------
def activations(n: int = TOKENS, d: int = D_MODEL) -> torch.Tensor:
    """Heavy-tailed, anisotropic synthetic residual-stream activations (the same tensor for everyone)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)) + torch.randn(d, generator=g)


L0_TRAINED = 149  # the paper's L0 per token for its trained ReLU SAE (Table 2)
LR = 1e-8  # Adam's first steps move every weight by ~lr; a tiny one keeps the sparsity being timed as set


def our_sae(arch: str, x: torch.Tensor, l0: int | None = None) -> SAE:
    """Our SAE at initialisation (b_dec the geometric median, unit input scale so a peer can share the
    weights); with l0, b_enc is lowered so that about l0 latents fire per token, as in a trained ReLU SAE."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_model=D_MODEL, d_sae=D_SAE, arch=arch, k=K, l1_coeff=8e-5))
    sae.init_from_sample(x[:1024])
    with torch.no_grad():
        sae.b_dec.div_(sae.input_scale)
        sae.input_scale.fill_(1.0)
        if l0:
            sae.b_enc.fill_(-sae.pre_acts(x).topk(l0, dim=-1).values[:, -1].median().item())
    return sae


def ours(sae: SAE, x: torch.Tensor):
    opt = make_optimizer(sae, LR)
    since = torch.zeros(D_SAE, dtype=torch.long, device=x.device)
    return lambda: train_step(sae, opt, x, since)


def saelens(arch: str, x: torch.Tensor, sparse: bool = False, weights: SAE | None = None):
    """SAELens's own training step (SAETrainer._train_step without schedulers): training_forward_pass,
    firing counts, backward, gradient clipping, Adam."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, l1_coefficient=8e-5))
        coeffs = {"l1": 8e-5}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K, use_sparse_activations=sparse))
        coeffs = {}
    sae = sae.to(x.device)
    if weights is not None:  # the very same function as ours: same codes, same sparsity
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(weights, name))
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    since = torch.zeros(D_SAE, device=x.device)
    state = {"step": 0}

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeffs, dead_neuron_mask=since > 64,
                                                       n_training_steps=state["step"], is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            since.add_(1)
            since[fired.to_dense() if fired.is_sparse else fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        state["step"] += 1

    return step


def timed(name: str, make) -> float | None:
    """Seconds per step, or None (printed as failed) if this implementation raises on this machine."""
    try:
        t = best_time(make(), STEP_REPS)
    except Exception as exc:  # noqa: BLE001 - a peer's setting that fails here is reported, not hidden
        print(f"  {name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})", flush=True)
        return None
    print(f"  {name}: {t:.2f} s/step ({TOKENS / t:,.0f} tokens/s)", flush=True)
    return t


def bench_sae_step() -> None:
    print(f"a. SAE step, {D_MODEL} -> {D_SAE:,}, {TOKENS:,} tokens, threads={torch.get_num_threads()}", flush=True)
    x = activations()
    W = torch.randn(D_MODEL, D_SAE)
    out = torch.empty(TOKENS, D_SAE)
    t_gemm = best_time(lambda: torch.mm(x, W, out=out))
    del W, out
    flops = 2 * TOKENS * D_MODEL * D_SAE / t_gemm
    print(f"  encoder GEMM: {t_gemm:.2f} s ({flops / 1e9:.0f} GFLOP/s -> bound {TOKENS / t_gemm:,.0f} tokens/s)")
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        print("  sae-lens is not installed (pip install -e '.[bench]'); SAELens comparisons skipped")
        have_peer = False
    else:
        have_peer = True
    t, peers = {}, {}
    for regime, l0 in (("trained", L0_TRAINED), ("init", None)):
        w = our_sae("relu", x, l0)
        with torch.no_grad():
            print(f"  ReLU SAE {regime}: L0 = {(w.pre_acts(x) > 0).sum(-1).float().mean():.0f} latents per token")
        t[f"ours relu {regime}"] = timed(f"ours relu ({regime})", lambda: ours(w, x))
        if have_peer:
            peers[f"relu {regime}"] = timed(f"SAELens standard ({regime})", lambda: saelens("relu", x, weights=w))
        del w
    t["ours topk"] = timed("ours topk", lambda: ours(our_sae("topk", x), x))
    bench_topk_kernels(x)
    W, out = torch.randn(D_MODEL, D_SAE), torch.empty(TOKENS, D_SAE)
    t_gemm = min(t_gemm, best_time(lambda: torch.mm(x, W, out=out)))  # again next to the TopK timing
    print(f"  encoder GEMM, measured again: best {t_gemm:.2f} s", flush=True)
    del W, out
    if have_peer:
        peers["topk dense"] = timed("SAELens topk, use_sparse_activations=False", lambda: saelens("topk", x))
        peers["topk sparse"] = timed("SAELens topk, use_sparse_activations=True", lambda: saelens("topk", x, sparse=True))
    a = "a. SAE step"
    if peers:
        for regime, key, desc in (("trained", "relu_sparse_vs_saelens", f"L0 = {L0_TRAINED}, a trained SAE's sparsity"),
                                  ("init", "relu_init_vs_saelens", "at initialisation, half the latents active")):
            p = peers[f"relu {regime}"]
            row(a, key, f"ReLU, {desc}: ours vs SAELens standard, same weights (target >= 1.2x)",
                over(p, t[f"ours relu {regime}"]), failed="SAELens failed")
        ok = [v for k, v in peers.items() if k.startswith("topk") and v is not None]
        which = ", ".join(f"{k.split()[1]} {'failed' if peers[k] is None else f'{peers[k]:.2f} s'}"
                          for k in ("topk dense", "topk sparse"))
        row(a, "topk_vs_saelens", f"TopK: ours vs SAELens's faster (target >= 6x; {which})",
            over(min(ok), t["ours topk"]) if ok else None, failed="SAELens failed")
    row(a, "topk_vs_relu_init", "TopK vs our dense ReLU (at initialisation), same d_sae (target >= 3x)",
        over(t["ours relu init"], t["ours topk"]))
    row(a, "topk_vs_relu_sparse", f"TopK vs our ReLU at L0 = {L0_TRAINED} (sparse path)",
        over(t["ours relu trained"], t["ours topk"]))
    row(a, "topk_vs_gemm_bound", "TopK vs encoder-GEMM bound (target >= 0.75)", over(t_gemm, t["ours topk"]),
        times=False)
    row(a, "relu_sparse_vs_gemm_bound", f"ReLU at L0 = {L0_TRAINED} vs encoder-GEMM bound",
        over(t_gemm, t["ours relu trained"]), times=False)


def bench_topk_interleaved() -> None:
    """Section t: the TopK targets alone, the encoder GEMM, our TopK step and SAELens's TopK steps timed in turn
    within each round (best of BENCH_STEP_REPS + 1 rounds), so a busy machine slows every contender alike."""
    print(f"t. TopK step interleaved, {D_MODEL} -> {D_SAE:,}, k = {K}, {TOKENS:,} tokens, "
          f"threads={torch.get_num_threads()}", flush=True)
    x = activations()
    W, out = torch.randn(D_MODEL, D_SAE), torch.empty(TOKENS, D_SAE)
    fns = {"gemm": lambda: torch.mm(x, W, out=out), "ours": ours(our_sae("topk", x), x)}
    for sparse in (False, True):
        try:
            step = saelens("topk", x, sparse=sparse)
            step()
        except Exception as exc:  # noqa: BLE001 - reported, as in section a
            print(f"  SAELens topk sparse={sparse}: failed ({type(exc).__name__})", flush=True)
        else:
            fns[f"saelens sparse={sparse}"] = step
    t = interleaved_best(fns, STEP_REPS + 1)
    print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
    peers = [v for k, v in t.items() if k.startswith("saelens")]
    sec = "t. TopK interleaved"
    row(sec, "topk_vs_gemm_bound_interleaved", "TopK vs encoder-GEMM bound, interleaved (target >= 0.75)",
        t["gemm"] / t["ours"], times=False)
    row(sec, "topk_vs_saelens_interleaved", "TopK: ours vs SAELens's faster, interleaved (target >= 6x)",
        min(peers) / t["ours"] if peers else None, failed="SAELens failed")
    bench_topk_kernels(x, "t. TopK interleaved")


def bench_topk_kernels(x: torch.Tensor, section: str = "a. SAE step") -> None:
    """The TopK step's two selection-side kernels against what they replace, on the SAE's own pre-activations:
    grouped top-k vs torch.topk, and the encoder gradient as sorted embedding bags vs a COO sparse product."""
    from patchsae.sae.topk_select import latent_sums, topk_rows

    sae = our_sae("topk", x)
    with torch.no_grad():
        xc, pre = sae.centred(x), sae.pre_acts(x)
    idx = topk_rows(pre, K)[1]
    g = torch.randn(idx.shape)

    def coo():
        rows = torch.arange(len(x)).repeat_interleave(K)
        g_NS = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), g.reshape(-1), pre.shape,
                                       check_invariants=False)
        return torch.sparse.mm(g_NS.t(), xc)

    times = interleaved_best({"grouped": lambda: topk_rows(pre, K), "torch.topk": lambda: pre.topk(K, sorted=False),
                              "bags": lambda: latent_sums(idx, g, None, xc, D_SAE), "coo": coo}, max(REPS, 3))
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
    row(section, "topk_select_vs_torch_topk", f"top-{K} of {D_SAE:,} per token: grouped vs torch.topk",
        times["torch.topk"] / times["grouped"])
    row(section, "latent_sums_vs_coo", "encoder gradient: sorted embedding bags vs COO sparse.mm",
        times["coo"] / times["bags"])


def over(a: float | None, b: float | None) -> float | None:
    """a / b, None when either contender failed."""
    return None if a is None or b is None else a / b


# ---- b. extraction -------------------------------------------------------------------------------------------
def vit_b16():
    from transformers import CLIPConfig, CLIPModel

    from patchsae.models.clip import ClipModel, Preprocess

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2),
                     vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu"),
                     projection_dim=512)
    return ClipModel(CLIPModel(cfg).eval(), None, Preprocess(224), "random ViT-B/16", ())


def bench_extraction(batch: int = 8) -> None:
    print(f"b. extraction, random-weight ViT-B/16, {batch} images of 224 px", flush=True)
    model = vit_b16()
    px = torch.randn(batch, 3, 224, 224)

    @torch.no_grad()
    def full():
        return model.vision(pixel_values=px, output_hidden_states=True).hidden_states

    ref = full()
    assert torch.allclose(model.block_output(px, 10), ref[11], atol=1e-4)  # same tensor, fewer blocks
    # the paper's 1-based numbering: block 11 of 12 = index 10 = --layer -2
    runs = {"full": full, 11: lambda: model.block_output(px, 10), 8: lambda: model.block_output(px, 7)}
    times = interleaved_best(runs, max(REPS, 5))
    t_full = times["full"]
    for block in (11, 8):
        row("b. extraction", f"early_exit_block{block}", f"early exit after block {block} of 12 vs full forward "
            f"(target >= {1.05 if block == 11 else 1.3}x)", t_full / times[block])
    print(f"  full forward {batch / t_full:.1f} images/s", flush=True)


# ---- e. several layers ------------------------------------------------------------------------------------------
def bench_layers(batch: int = int(os.environ.get("BENCH_LAYERS_BATCH", 8))) -> None:
    """Three blocks from one pass (`block_outputs`, what `cache --layers` runs) vs one block, and vs three
    separate passes; the three outputs are checked equal bitwise to single-block extraction first."""
    print(f"e. several layers, random-weight ViT-B/16, {batch} images of 224 px: blocks 11, 8, 5 of 12", flush=True)
    model = vit_b16()
    px = torch.randn(batch, 3, 224, 224)
    layers = [10, 7, 4]
    assert all(torch.equal(a, model.block_output(px, L)) for a, L in zip(model.block_outputs(px, layers), layers))
    runs = {"one block": lambda: model.block_output(px, 10), "three, one pass": lambda: model.block_outputs(px, layers),
            "three passes": lambda: [model.block_output(px, L) for L in layers]}
    times = interleaved_best(runs, max(REPS, 5))
    row("e. several layers", "layers_three_vs_one", "three blocks from one pass vs one block (one forward pass; "
        "target <= 1.05x)", over(times["three, one pass"], times["one block"]))
    row("e. several layers", "layers_three_passes_vs_one_pass", "three separate passes vs three blocks from one pass",
        over(times["three passes"], times["three, one pass"]))


# ---- c. cache vs on the fly -----------------------------------------------------------------------------------
def bench_cache_vs_on_the_fly(n_images: int = 2048, steps: int = 20) -> None:
    from patchsae.activations.cache import ActivationCache, build_cache
    from patchsae.activations.tokens import CachedTokens, StreamedTokens
    from patchsae.data.base import FirstN
    from patchsae.data.fashion_mnist import FashionMNIST
    from patchsae.models.load import load_model
    from patchsae.runs import EMBEDDED_DEFAULTS

    print(f"c. training on the embedded model: fp16 cache vs on-the-fly extraction, {steps} steps", flush=True)
    model = load_model("embedded")
    ds = FirstN(FashionMNIST("train"), n_images)
    bt, k, exp = EMBEDDED_DEFAULTS["batch_tokens"], EMBEDDED_DEFAULTS["k"], EMBEDDED_DEFAULTS["expansion"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_cache(model, ds, -2, tmp, progress=False)
        t_cache = time.perf_counter() - t0
        sources = {"cache": CachedTokens(ActivationCache(tmp)), "on the fly": StreamedTokens(model, ds, -2)}
        rate = {}
        for name, src in sources.items():
            torch.manual_seed(0)
            sae = SAE(SAEConfig(d_model=model.d_model, d_sae=exp * model.d_model, arch="topk", k=k))
            sae.init_from_sample(src.sample(4096))
            opt, since = make_optimizer(sae, 1e-3), torch.zeros(sae.cfg.d_sae, dtype=torch.long)
            it = src.batches(bt)
            train_step(sae, opt, next(it), since)  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(sae, opt, next(it), since)
            rate[name] = steps * bt / (time.perf_counter() - t0)
            print(f"  {name}: {rate[name]:,.0f} tokens/s", flush=True)
    n_tok = n_images * model.layout().n_tokens
    print(f"  building the cache: {n_tok / t_cache:,.0f} tokens/s ({n_images} images)", flush=True)
    row("c. cache vs on the fly", "cache_vs_on_the_fly", "training tokens/s, fp16 cache vs on-the-fly extraction",
        rate["cache"] / rate["on the fly"])


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    sections = sys.argv[1:] or ["a", "b", "c", "e"]
    t0 = time.time()
    for s in sections:
        {"a": bench_sae_step, "b": bench_extraction, "c": bench_cache_vs_on_the_fly, "e": bench_layers,
         "t": bench_topk_interleaved}[s]()
    write_results("bench.py " + " ".join(sections), time.time() - t0)
    print(f"\nbenchmark summary (python benchmarks/bench.py {' '.join(sections)}; {time.time() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads; after a warm-up, best of {STEP_REPS} SAE steps, of {REPS} otherwise)")
    print(f"| section | comparison | ratio |\n|---|---|---|")
    for section, what, value in ROWS:
        print(f"| {section} | {what} | {value} |")


if __name__ == "__main__":
    main()
