"""`make bench` GPU section (run when CUDA is present; about 3-5 minutes on one data-centre GPU, at most 8):

  1. the GPU's measured GEMM rates: bf16 (8,192^3) and the SAE's fp32 encoder product (4,096 x 768 x 49,152,
     TF32 off, and with TF32 on);
  2. extraction on a random-weight ViT-B/16 (real size, synthetic 224 px inputs, so image decoding does not
     count): images/s after block 11 of 12 in fp32 and under bf16 autocast, against the forward's FLOP bound at
     the measured bf16 GEMM rate;
  3. one SAE training step at 768 -> 49,152, 4,096 tokens: ours (ReLU at initialisation = dense path, ReLU at a
     trained SAE's L0 = sparse path, TopK k = 64, TopK with TF32 matmuls) against SAELens's own steps on the
     same GPU (standard; TopK with use_sparse_activations off and on) and against the encoder-GEMM bound;
     each contender is built, timed and dropped in turn, so its peak GPU memory is its own;
  4. the projected wall time of `--preset paper` (cache + train) on this GPU from those rates.

Every ratio is printed and merged into runs/bench/results.json (keys gpu_*), with the absolute rates, the
GPU's name and the peak memories under runs["gpu.py"]. Without CUDA it refuses with one line and exit status 2.
`--device cpu` runs the same code at whatever BENCH_D_SAE / BENCH_TOKENS say, to check it without a GPU (its
numbers mean nothing).
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402  (same folder: shared contenders, rows and the results file)
from bench import D_MODEL, D_SAE, L0_TRAINED, TOKENS, interleaved_best, over, row  # noqa: E402

EXTRACT_BATCH = 256  # images per forward
STEP_REPS = 5  # interleaved rounds of the SAE steps (a GPU step takes tens of milliseconds)


def sync_timer(device: torch.device):
    """Wrap a function so that its timing covers the GPU work it queued."""
    def wrap(fn):
        def run():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run
    return wrap


def gemm_rates(device: torch.device, timed) -> dict:
    """FLOP/s of a large bf16 GEMM (the ceiling for bf16 extraction) and of the SAE's encoder product in fp32
    (TF32 off: the bound our fp32 step is measured against) and with TF32 allowed."""
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(TOKENS, D_MODEL, device=device)
    w = torch.randn(D_MODEL, D_SAE, device=device)

    def tf32(on: bool):
        def run():
            torch.set_float32_matmul_precision("high" if on else "highest")  # as train's --sae-dtype tf32
            return x @ w
        return run

    t = interleaved_best({"bf16": timed(lambda: a @ b), "fp32": timed(tf32(False)), "tf32": timed(tf32(True))}, 5)
    torch.set_float32_matmul_precision("highest")
    enc = 2 * TOKENS * D_MODEL * D_SAE
    rates = {"bf16_gemm_flops": 2 * n ** 3 / t["bf16"], "encoder_gemm_s": t["fp32"], "encoder_gemm_tf32_s": t["tf32"]}
    print(f"  bf16 GEMM {rates['bf16_gemm_flops'] / 1e12:.1f} TFLOP/s; encoder GEMM fp32 {t['fp32'] * 1e3:.2f} ms "
          f"({enc / t['fp32'] / 1e12:.1f} TFLOP/s), TF32 {t['tf32'] * 1e3:.2f} ms", flush=True)
    return rates


def vit_flops(blocks: int, tokens: int = 197, d: int = 768, mlp: int = 3072, patch_dim: int = 3 * 16 * 16) -> int:
    """Multiply-add FLOPs (2 per MAC) of a ViT forward through `blocks` blocks: patch embedding, then per block
    the q/k/v and output projections, the two attention products and the MLP (norms and softmax omitted)."""
    per_block = 2 * tokens * d * (4 * d + 2 * mlp) + 4 * tokens * tokens * d
    return 2 * (tokens - 1) * patch_dim * d + blocks * per_block


def bench_extraction(device: torch.device, timed, bf16_flops: float) -> dict:
    model = bench.vit_b16()
    model.hf.to(device)
    batch = EXTRACT_BATCH if device.type == "cuda" else 2
    px = torch.randn(batch, 3, 224, 224, device=device)
    dtype_of = {"fp32": None, "bf16": torch.bfloat16}

    def extract(name):
        @torch.no_grad()
        def run():
            with torch.autocast(device.type, dtype=dtype_of[name], enabled=dtype_of[name] is not None):
                return model.block_output(px, 10)  # block 11 of 12, the paper's --layer -2
        return timed(run)

    with torch.no_grad():  # the bf16 forward computes the fp32 one's activations, to bf16 precision
        ref, low = extract("fp32")(), extract("bf16")()
        rel = ((low.float() - ref).norm() / ref.norm()).item()
    times, peak = {}, {}
    for name in dtype_of:
        times[name], peak[name] = peak_and_time(device, lambda: extract(name), reps=5)
    out = {}
    bound = bf16_flops / vit_flops(11)  # images/s if the forward ran at the measured bf16 GEMM rate
    for name in dtype_of:
        ips = batch / times[name]
        out[f"extract_{name}_images_per_s"] = ips
        out[f"extract_{name}_peak_mb"] = peak[name]
        print(f"  extraction {name}: {ips:,.0f} images/s, peak {peak[name]} MB", flush=True)
        row("gpu", f"gpu_extract_{name}_vs_flop_bound", f"extraction {name}, block 11: images/s vs FLOP bound at "
            f"the bf16 GEMM rate{' (target >= 0.5)' if name == 'bf16' else ''}", ips / bound, times=False)
    row("gpu", "gpu_extract_bf16_vs_fp32", "extraction images/s: bf16 autocast vs fp32", times["fp32"] / times["bf16"])
    out["extract_bf16_relative_error"] = rel
    print(f"  bf16 vs fp32 block-11 activations: relative error {rel:.2e}", flush=True)
    del model
    return out


def peak_and_time(device: torch.device, make, reps: int) -> tuple[float, int | None]:
    """Best time of the function `make()` builds, and the peak GPU memory in MB it needed: building it (weights,
    optimiser) and running it, above what was allocated before (None on CPU). It is dropped afterwards."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t = interleaved_best({"fn": make()}, reps)["fn"]
    peak = round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20) if device.type == "cuda" else None
    return t, peak


def bench_sae_steps(device: torch.device, timed, gemm: dict) -> dict:
    """Each contender built, timed and dropped in turn, so that its peak memory is its own; SAELens's ReLU
    steps get our weights (same codes, same sparsity)."""
    x_cpu = bench.activations()
    x = x_cpu.to(device)
    relu_w = {regime: bench.our_sae("relu", x_cpu, l0) for regime, l0 in (("trained", L0_TRAINED), ("init", None))}

    def ours(arch, weights=None, tf32=False):
        def make():
            sae = copy.deepcopy(weights) if weights is not None else bench.our_sae(arch, x_cpu)
            step = bench.ours(sae.to(device), x)

            def run():
                torch.set_float32_matmul_precision("high" if tf32 else "highest")
                step()
            return timed(run)
        return make

    made = {"ours relu trained": ours("relu", relu_w["trained"]), "ours relu init": ours("relu", relu_w["init"]),
            "ours topk": ours("topk"), "ours topk tf32": ours("topk", tf32=True),
            "saelens relu trained": lambda: timed(bench.saelens("relu", x, weights=relu_w["trained"])),
            "saelens relu init": lambda: timed(bench.saelens("relu", x, weights=relu_w["init"])),
            "saelens topk dense": lambda: timed(bench.saelens("topk", x)),
            "saelens topk sparse": lambda: timed(bench.saelens("topk", x, sparse=True))}
    t, peak, out = {}, {}, {}
    for name, make in made.items():
        try:
            t[name], peak[name] = peak_and_time(device, make, STEP_REPS)
        except Exception as exc:  # noqa: BLE001 - a peer's setting that fails here is reported, not hidden
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})", flush=True)
            t[name], peak[name] = None, None
            continue
        out[f"{name.replace(' ', '_')}_tokens_per_s"] = TOKENS / t[name]
        out[f"{name.replace(' ', '_')}_peak_mb"] = peak[name]
        print(f"  {name}: {t[name] * 1e3:.1f} ms/step ({TOKENS / t[name]:,.0f} tokens/s), peak {peak[name]} MB",
              flush=True)
    torch.set_float32_matmul_precision("highest")
    peers = [v for k, v in t.items() if k.startswith("saelens topk") and v is not None]
    row("gpu", "gpu_topk_vs_saelens", "TopK step: ours vs SAELens's faster TopK (target >= 3x)",
        over(min(peers), t["ours topk"]) if peers else None, failed="SAELens failed")
    for regime, key in (("trained", "gpu_relu_sparse_vs_saelens"), ("init", "gpu_relu_init_vs_saelens")):
        row("gpu", key, f"ReLU step ({regime}): ours vs SAELens standard, same weights",
            over(t[f"saelens relu {regime}"], t[f"ours relu {regime}"]), failed="a contender failed")
    row("gpu", "gpu_topk_vs_gemm_bound", "TopK step vs the fp32 encoder-GEMM bound (target >= 0.5)",
        over(gemm["encoder_gemm_s"], t["ours topk"]), times=False)
    row("gpu", "gpu_topk_tf32_vs_gemm_bound", "TopK step with TF32 matmuls vs the TF32 encoder-GEMM bound",
        over(gemm["encoder_gemm_tf32_s"], t["ours topk tf32"]), times=False)
    row("gpu", "gpu_relu_sparse_vs_gemm_bound", f"ReLU step at L0 = {L0_TRAINED} vs the fp32 encoder-GEMM bound",
        over(gemm["encoder_gemm_s"], t["ours relu trained"]), times=False)
    return out


def paper_projection(rates: dict) -> dict:
    """Hours of `--preset paper` on this GPU: building the cache at the bf16 extraction rate, then training at
    our ReLU step's rate at a trained SAE's sparsity (the regime of all but the first steps), both as measured
    here on 4,096-token steps and 256-image batches; data loading assumed to keep up."""
    from patchsae.runs.presets import budget, preset_config
    b = budget(preset_config("paper"))
    cache_s = b["images"] / rates["extract_bf16_images_per_s"]
    train_rate = rates.get("ours_relu_trained_tokens_per_s")
    train_s = b["trained_tokens"] / train_rate if train_rate else float("nan")
    print(f"  --preset paper: cache {b['images']:,} images {cache_s / 3600:.2f} h + train {b['trained_tokens']:,} "
          f"tokens {train_s / 3600:.2f} h = {(cache_s + train_s) / 3600:.2f} h", flush=True)
    return {"paper_cache_hours": cache_s / 3600, "paper_train_hours": train_s / 3600,
            "paper_total_hours": (cache_s + train_s) / 3600}


def main(argv: list[str]) -> int:
    device = torch.device("cpu" if argv[:2] == ["--device", "cpu"] else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: error: no CUDA device (torch.cuda.is_available() is False); this benchmark "
              "needs a GPU (`--device cpu` only checks the script)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (script check only)"
    print(f"GPU benchmark on {name}, torch {torch.__version__}", flush=True)
    t0 = time.time()
    timed = sync_timer(device)
    gemm = gemm_rates(device, timed)
    rates = {**gemm, **bench_extraction(device, timed, gemm["bf16_gemm_flops"])}
    rates.update(bench_sae_steps(device, timed, gemm))
    rates.update(paper_projection(rates))
    if device.type == "cuda":  # a script check's numbers are not results
        bench.write_results("gpu.py", time.time() - t0, {"device": name, **rates})
    print(f"\nGPU benchmark summary ({name}; {time.time() - t0:.0f} s)")
    print("| section | comparison | ratio |\n|---|---|---|")
    for section, what, value in bench.ROWS:
        print(f"| {section} | {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
