"""RunConfig: what a run is (model, data, hooked block, token set, SAE and training settings), saved as the run's
config.json; and the quickstart's defaults on the embedded model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from patchsae import PatchSAEError
from patchsae.options import opt

MODEL_HELP = ("model to open: 'embedded' (default), a local Hugging Face CLIP, SigLIP or DINOv2 folder, a hub id "
              "such as openai/clip-vit-base-patch16, or an OpenAI-layout .pt/.safetensors file (see `patchsae "
              "models`)")
ACT_HELP = ("MLP activation of an OpenAI-layout checkpoint file: quick_gelu (OpenAI's) or gelu (most open_clip "
            "LAION/DataComp models); default: an open_clip config beside the file or its name decides, else "
            "quick_gelu, said in one line")
DATASET_HELP = ("'fashion-mnist', 'digits' (scikit-learn's 8x8 digits), a name from `patchsae datasets` (e.g. "
                "eurosat), a folder of class subfolders, a datasets save_to_disk folder, or hf:NAME")
DATASET_PATH_HELP = ("local copy of a `patchsae datasets` entry (a save_to_disk folder or an image folder); "
                     "used instead of the Hugging Face hub")


@dataclass(frozen=True)
class RunConfig:
    model: str = opt("embedded", MODEL_HELP, show_default=False)
    act: str | None = opt(None, ACT_HELP, show_default=False, choices=("quick_gelu", "gelu"))
    dataset: str = opt("fashion-mnist", DATASET_HELP, show_default=False)
    dataset_path: str | None = opt(None, DATASET_PATH_HELP, show_default=False)
    train_split: str = opt("train", "split whose activations are cached and trained on", show_default=False)
    eval_split: str = opt("test", "held-out split for evaluation", show_default=False)
    layer: int = opt(-2, "block whose output (residual stream) is hooked; negative counts from the end (-2 = paper)",
                     show_default=False)
    layers: tuple[str, ...] | None = opt(
        None, "several blocks from one forward pass (e.g. -2 -5 -8, or all): one cache and one SAE per block, "
        "stored under layer<L>/ (docs/formats.md); replaces --layer", metavar="L", show_default=False)
    tokens: str = opt("all", "tokens to train on: all (CLS + patches, the paper), patch, cls, register (DINOv2's "
                      "register tokens) or all+register; register tokens are kept apart unless named",
                      show_default=False, choices=("all", "patch", "cls", "register", "all+register"))
    max_train_images: int | None = opt(None, "cache only the first N training images", show_default=False)
    max_eval_images: int | None = opt(None, "evaluate on the first N held-out images", show_default=False)
    arch: str = opt("relu", "relu (paper: ReLU + L1, ghost grads), topk (TopK + AuxK), batchtopk (BatchTopK + AuxK; "
                    "runs as JumpReLU with the learnt threshold afterwards) or jumprelu (JumpReLU + L0 penalty, "
                    "--l0-coeff)", show_default=False)
    expansion: int = opt(32, "d_sae = expansion x d_model (paper: 64)", show_default=False)
    k: int = opt(32, "active latents per token for topk", show_default=False)
    l1_coeff: float = opt(8e-5, "L1 coefficient lambda for relu (paper: 8e-5)", show_default=False)
    l0_coeff: float = opt(1e-3, "L0 penalty coefficient for jumprelu", show_default=False)
    objective: str = opt("scaled", "relu only: scaled (activations scaled once to E||x||^2 = d_model, plain MSE) or "
                         "reference (the reference code's loss: raw activations, MSE normalised by each token's "
                         "norm, its ghost grads, Kaiming init; the paper preset)", choices=("scaled", "reference"),
                         show_default=False)
    mse_cls_coefficient: float = opt(1.0, "reference objective: weight of the CLS tokens' error in the MSE",
                                     show_default=False)
    lr: float = opt(4e-4, "Adam learning rate (paper: 4e-4)", show_default=False)
    warmup_steps: int = opt(500, "linear warm-up steps (paper: 500)", show_default=False)
    batch_tokens: int = opt(4096, "tokens per training step", show_default=False)
    epochs: float = opt(1.0, "passes over the cached tokens", show_default=False)
    seed: int = opt(0, "random seed (initialisation and token order)", show_default=False)
    device: str = opt("cpu", "cpu or cuda", show_default=False)
    batch_images: int = opt(256, "images per forward pass when extracting", show_default=False)
    dtype: str = opt("fp32", "precision of the model's forward when extracting activations: fp32, or bf16 / fp16 "
                     "under autocast (GPU tensor cores; AMX on recent CPUs); the cache is fp16 either way",
                     choices=("fp32", "bf16", "fp16"), show_default=False)
    sae_dtype: str = opt("fp32", "precision of the SAE's matmuls in training: fp32 (exact), tf32 (CUDA tensor cores) "
                         "or bf16 (GPU tensor cores; oneDNN/AMX on CPU); weights and Adam stay fp32",
                         choices=("fp32", "tf32", "bf16"), show_default=False)

    def __post_init__(self):
        if self.layers is not None:  # one spelling, so a config read back from JSON equals the one given
            object.__setattr__(self, "layers", normalise_layers(self.layers))

    def to_json(self) -> dict:
        out = asdict(self)
        if self.layers is None:  # single-layer runs keep today's config.json
            del out["layers"]
        return out


def normalise_layers(layers) -> tuple[str, ...]:
    """--layers as given -> ('all',) or block indices as strings ('-2', '10'); one clear line for anything else."""
    items = tuple(str(x).strip() for x in layers)
    if items == ("all",):
        return items
    try:
        return tuple(str(int(x)) for x in items) if items else ()
    except ValueError:
        raise PatchSAEError(f"--layers takes block indices (e.g. -2 -5 -8) or 'all', not {' '.join(items)!r}"
                            ) from None


def resolve_layers(cfg: RunConfig, n_blocks: int) -> list[int]:
    """The run's hooked blocks as indices 0..n_blocks-1, in the order given, each once: --layers if given, else
    --layer alone."""
    given = ([str(cfg.layer)] if cfg.layers is None else
             [str(i) for i in range(n_blocks)] if cfg.layers == ("all",) else list(cfg.layers))
    if not given:
        raise PatchSAEError("--layers needs at least one block index (or 'all')")
    out: list[int] = []
    for x in map(int, given):
        if not -n_blocks <= x < n_blocks:
            raise PatchSAEError(f"layer {x} does not exist: the model has {n_blocks} blocks "
                                f"(valid: {-n_blocks}..{n_blocks - 1})")
        if x % n_blocks not in out:
            out.append(x % n_blocks)
    return out


# What the quickstart uses on the embedded model, chosen by the sweep in docs (scripts/sweep_embedded.py): TopK
# reaches the targets there, ReLU + L1 (--arch relu, lambda 3e-2) just misses.
EMBEDDED_DEFAULTS = dict(arch="topk", k=24, expansion=16, l1_coeff=3e-2, lr=1e-3, batch_tokens=1024,
                         warmup_steps=100, epochs=1.0)


def start_config(model: str | None, preset: str | None = None) -> RunConfig:
    """The config a new run starts from: a named preset, or the defaults for the chosen model."""
    from dataclasses import replace

    if preset:
        from patchsae.runs.presets import preset_config

        return preset_config(preset)
    return replace(RunConfig(), **EMBEDDED_DEFAULTS) if (model or "embedded") == "embedded" else RunConfig()
