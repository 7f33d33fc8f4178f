"""Named configurations (`--preset paper`) and the budget a run will need, computed without model or network.

The dry run (`patchsae train --preset paper --dry-run --run DIR`) answers "what will this cost?" before a
multi-day job: tokens, cache size, SAE memory and steps follow from the model's shape (a small table of known
CLIP towers, so the model need not be loaded) and the dataset's size (from the registry).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from patchsae import PatchSAEError
from patchsae.runs.config import RunConfig

PAPER_IMAGES_PER_STEP = 128
VIT_B16_TOKENS = 197  # 14 x 14 patches + CLS

# Lim et al. (ICLR 2025): ViT-B/16, block 11 of 12 (index -2), all tokens, ReLU SAE x64, lambda 8e-5, Adam 4e-4
# with 500 warm-up steps, 128 images per step, ImageNet-1k train; ~2.6 M images seen, i.e. about two passes.
# Ghost grads (the relu default) and the geometric-median b_dec are always on in this package. lambda = 8e-5
# belongs to the reference code's objective (raw activations, per-token normalised MSE), so the preset uses it.
PRESETS: dict[str, dict] = {
    "paper": dict(model="openai/clip-vit-base-patch16", dataset="imagenet-1k", train_split="train",
                  eval_split="validation", layer=-2, tokens="all", arch="relu", expansion=64, l1_coeff=8e-5,
                  objective="reference", lr=4e-4, warmup_steps=500, batch_tokens=PAPER_IMAGES_PER_STEP * VIT_B16_TOKENS, epochs=2.0),
}


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    n_blocks: int
    tokens: int  # per image, CLS included


MODEL_SHAPES = {
    "openai/clip-vit-base-patch16": ModelShape(768, 12, 197),
    "openai/clip-vit-base-patch32": ModelShape(768, 12, 50),
    "openai/clip-vit-large-patch14": ModelShape(1024, 24, 257),
    "openai/clip-vit-large-patch14-336": ModelShape(1024, 24, 577),
}


def preset_config(name: str) -> RunConfig:
    if name not in PRESETS:
        raise PatchSAEError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(RunConfig(), **PRESETS[name])


def budget(cfg: RunConfig) -> dict:
    """Tokens, bytes and steps of a run, from the shape table and the registry (no model, no network)."""
    from patchsae.activations.tokens import token_positions
    from patchsae.data.registry import lookup
    from patchsae.runs.config import resolve_layers

    shape = MODEL_SHAPES.get(cfg.model)
    if shape is None:
        raise PatchSAEError(f"--dry-run knows the shapes of {', '.join(MODEL_SHAPES)}, not {cfg.model!r}")
    info = lookup(cfg.dataset)
    n_data = info.sizes.get(cfg.train_split) if info is not None else None
    if n_data is None and cfg.max_train_images is None:
        raise PatchSAEError(f"size of {cfg.dataset}/{cfg.train_split} unknown; give --max-train-images N")
    images = min(x for x in (n_data, cfg.max_train_images) if x is not None)
    per_image = len(token_positions(["cls"] + ["patch"] * (shape.tokens - 1), cfg.tokens))
    cached_tokens = images * shape.tokens
    trained_tokens = int(cfg.epochs * images * per_image)
    d_sae = cfg.expansion * shape.d_model
    params = 2 * shape.d_model * d_sae + d_sae + shape.d_model
    blocks = resolve_layers(cfg, shape.n_blocks)  # --layers: one cache and one SAE per block
    return {"d_model": shape.d_model, "n_blocks": shape.n_blocks, "hooked_block": blocks[0], "blocks": blocks,
            "tokens_per_image": shape.tokens, "images": images, "cached_tokens": cached_tokens,
            "cache_bytes_fp16": cached_tokens * shape.d_model * 2 * len(blocks), "trained_tokens": trained_tokens,
            "d_sae": d_sae, "sae_params": params, "sae_bytes_fp32": params * 4,
            "sae_adam_bytes_fp32": 3 * params * 4, "batch_tokens": cfg.batch_tokens,
            "images_per_step": cfg.batch_tokens / shape.tokens,
            "steps": math.ceil(trained_tokens / cfg.batch_tokens)}


def _gb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e9:,.1f} GB)"


def _objective(cfg: RunConfig) -> str:
    if cfg.arch != "relu":
        return f"{cfg.arch} (scaled activations, plain MSE)"
    if cfg.objective == "reference":
        return (f"relu, reference: raw activations, MSE normalised by each token's norm (CLS weight "
                f"{cfg.mse_cls_coefficient:g}), lambda {cfg.l1_coeff:g}")
    return f"relu, scaled: activations scaled to E||x||^2 = d_model, plain MSE, lambda {cfg.l1_coeff:g}"


def format_dry_run(cfg: RunConfig, b: dict) -> str:
    lines = ["resolved configuration:", json.dumps(cfg.to_json(), indent=2), "budget:",
             f"  model shape          width {b['d_model']}, {b['n_blocks']} blocks, {b['tokens_per_image']} "
             f"tokens per image; hooked block index {b['hooked_block']} "
             f"(block {b['hooked_block'] + 1} of {b['n_blocks']})"
             + (f"; all hooked: {b['blocks']}, one cache and one SAE each (below: the cache of all blocks together; SAE, tokens and steps per block)"
                if len(b["blocks"]) > 1 else ""),
             f"  images               {b['images']:,}",
             f"  cached tokens        {b['cached_tokens']:,} (images x {b['tokens_per_image']})",
             f"  cache (fp16)         {_gb(b['cache_bytes_fp16'])}",
             f"  SAE                  {b['d_model']} -> {b['d_sae']:,} latents, {b['sae_params']:,} parameters, "
             f"{_gb(b['sae_bytes_fp32'])} in fp32",
             f"  SAE + Adam (fp32)    {_gb(b['sae_adam_bytes_fp32'])}",
             f"  objective            {_objective(cfg)}",
             f"  trained tokens       {b['trained_tokens']:,} ({cfg.epochs:g} epochs, tokens={cfg.tokens})",
             f"  batch                {b['batch_tokens']:,} tokens ({b['images_per_step']:g} images) per step",
             f"  steps                {b['steps']:,}",
             "dry run: nothing was written and no model or data was loaded"]
    return "\n".join(lines)
