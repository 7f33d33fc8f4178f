"""The rows of `patchsae ablate`: Table 2's ablations of the paper (Lim et al., ICLR 2025) as run configs, one per
row, each a change of one setting from the paper's recipe. Pure: no model, no files.

The paper ablates on ViT-B/16 (12 blocks): the hooked block (layers 2, 5, 8 and 11, counted from 1; 11 is its
default, our index -2), CLS token only vs all tokens, the expansion factor and lambda. On a model with another
depth, "layer l of 12" becomes the block at the same relative depth, floor(l x n / 12) counted from 1, so that
layer 11 of 12 stays the second-to-last block on a 6- or 12-block model (the paper's index -2)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchsae.runs.config import RunConfig, start_config

PAPER_LAYERS = (2, 5, 8, 11)  # Table 2's hooked layers, counted from 1 in a 12-block ViT-B/16
PAPER_DEFAULT_LAYER = 11
EXPANSIONS = (32, 64, 128)  # Table 2's expansion factors; 64 is the paper's
LAMBDA_FACTORS = (0.0, 10.0)  # lambda ablations, as multiples of the recipe's lambda (1 is the default row)
# The reference objective's lambda on the embedded model: docs/method.md's sweep (one epoch, x16) put L0 / d_model
# at 0.19, the paper's 148.6 / 768, with lambda = 2.5e-3; 8e-5 (the paper's) leaves that model almost dense.
EMBEDDED_REFERENCE_L1 = 2.5e-3


def equivalent_block(paper_layer: int, n_blocks: int) -> int:
    """Index (from 0) of the block at the depth of the paper's layer `paper_layer` of 12 (counted from 1)."""
    return max(1, min(n_blocks, paper_layer * n_blocks // 12)) - 1


@dataclass(frozen=True)
class AblationRow:
    name: str  # the row's run directory under --root
    setting: str  # what the row changes, as the table prints it
    group: str  # layer, tokens, expansion or lambda
    cfg: RunConfig
    paper: str | None = None  # label of the paper's Table 2 row for the same setting, if it printed one
    unavailable: str | None = None  # why this model cannot run the row (it is then listed, not run)


def recipe(base: RunConfig, n_blocks: int) -> RunConfig:
    """The paper's recipe on `base`'s model and data: ReLU + L1 with the reference objective, x64, all tokens, the
    block equivalent to layer 11. `base` keeps everything else (lambda, learning rate, batch, data, device)."""
    return replace(base, arch="relu", objective="reference", expansion=64, tokens="all", layers=None,
                   layer=equivalent_block(PAPER_DEFAULT_LAYER, n_blocks))


def base_config(model: str | None, given: dict) -> RunConfig:
    """The starting config of an ablation: the model's defaults, the embedded model's lambda for the reference
    objective, then what the user gave."""
    cfg = start_config(model)
    if (model or "embedded") == "embedded":
        cfg = replace(cfg, l1_coeff=EMBEDDED_REFERENCE_L1)
    return replace(cfg, **given)


def rows(base: RunConfig, n_blocks: int, has_cls: bool = True) -> list[AblationRow]:
    """Every row, the default first; a paper layer whose equivalent block repeats an earlier one (models of
    fewer than 12 blocks can map two layers to one block) is left out, as it would repeat that row. Without a
    CLS token (SigLIP), the CLS-only row is kept but marked unavailable."""
    from patchsae.analysis.paper import PAPER_TABLE2

    paper = {key: label for key, label in zip(("default", "cls", "layer8", "layer5"), (r[0] for r in PAPER_TABLE2))}
    default = recipe(base, n_blocks)
    lam = default.l1_coeff
    out = [AblationRow("default", f"default: block {default.layer}, all tokens, x64, lambda {lam:g}", "default",
                       default, paper["default"])]
    seen = {default.layer}
    for layer in PAPER_LAYERS:
        block = equivalent_block(layer, n_blocks)
        if block in seen:
            continue
        seen.add(block)
        out.append(AblationRow(f"layer{layer}", f"layer {layer} of 12: block {block}", "layer",
                               replace(default, layer=block), paper.get(f"layer{layer}")))
    out.append(AblationRow("cls", "CLS token only", "tokens", replace(default, tokens="cls"), paper["cls"],
                           None if has_cls else "the model has no CLS token (SigLIP pools its patch tokens)"))
    out += [AblationRow(f"x{e}", f"expansion x{e}", "expansion", replace(default, expansion=e))
            for e in EXPANSIONS if e != default.expansion]
    out += [AblationRow(f"lambda{f:g}x", f"lambda {f:g} x {lam:g} = {f * lam:g}", "lambda",
                        replace(default, l1_coeff=f * lam)) for f in LAMBDA_FACTORS]
    return out


def training_bytes(cfg: RunConfig, d_model: int) -> int:
    """What training one row holds in memory, about: fp32 weights, their gradients and Adam's two moments (4
    copies of the parameters), and a step's pre-activations, codes and their gradients (3 x batch x d_sae)."""
    d_sae = cfg.expansion * d_model
    params = 2 * d_model * d_sae + d_sae + d_model
    return 4 * (4 * params + 3 * cfg.batch_tokens * d_sae)
