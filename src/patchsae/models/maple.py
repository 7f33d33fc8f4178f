"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023) on top of any `ClipModel`, CLIP weights frozen.

What is learnt (the official code's structure and parameter names, so official checkpoints load key for key):
  ctx                               (n_ctx, d_text)   text context tokens, initialised from the token embeddings
                                                      of the first n_ctx tokens of `ctx_init` ("a photo of a")
  proj                              Linear(d_text -> d_vision): the vision prompt of block 0 is proj(ctx)
  compound_prompts_text.{i}         (n_ctx, d_text)   text prompts of blocks 1..J-1 (std 0.02 at start)
  compound_prompt_projections.{i}   Linear(d_text -> d_vision): the vision prompt of block i+1 is
                                    compound_prompt_projections[i](compound_prompts_text[i]) (all start equal)

Text tower: the prompt "<ctx_init> <class name>." is tokenized and its tokens 1..n_ctx (after start-of-text) are
replaced by `ctx` before the positional embedding is added; before text blocks 1..J-1 those n_ctx positions are
overwritten by the block's compound prompt. With CLIP's BPE and ctx_init "a photo of a", n_ctx = 2 makes
"a photo" learnable and keeps "of a" as fixed text (as the official code does); the embedded model's byte-level
tokenizer makes the first two bytes ("a", " ") learnable instead, by the same rule.

Vision tower: n_ctx prompt tokens (no positional embedding) join the CLS and patch tokens before the pre-layer
norm; before vision blocks 1..J-1 their rows are overwritten by the block's projected compound prompt; above
block J-1 they flow on like any token. The official code appends them after the patches; attention in the vision
tower has no mask, so their position in the sequence does not change any output. Here they sit between CLS and
the patches, which is what `TokenLayout` describes (kind "prompt"), so every stage can leave them out.

Depth J: 9 for ViT-B/16 (12 blocks). For other depths J = round(0.75 x vision blocks), halves rounded up, capped
at the number of text blocks (the two towers share the J prompts): 4 for the embedded model (6 vision blocks,
4 text blocks).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from patchsae import PatchSAEError
from patchsae.models.backbone import TokenLayout
from patchsae.models.clip import ClipModel
from patchsae.pickles import load_pickled
from patchsae.utils import one_line, read_json_file, write_json, write_safetensors

PROMPTS_FILE = "prompts.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "patchsae-maple/1"
OFFICIAL_PREFIX = "prompt_learner."
OFFICIAL_DROPPED = ("token_prefix", "token_suffix")  # fixed token embeddings of the training class names


def default_depth(n_vision_layers: int, n_text_layers: int) -> int:
    """J = round(9/12 x vision blocks), halves up, capped at the text blocks: 9 for ViT-B/16, 4 for embedded."""
    return max(1, min(math.floor(0.75 * n_vision_layers + 0.5), n_text_layers))


@dataclass(frozen=True)
class MapleConfig:
    n_ctx: int = 2
    depth: int | None = None  # J; None: default_depth of the model
    ctx_init: str = "a photo of a"


class MaplePrompts(nn.Module):
    """The learnable prompts only (the official `MultiModalPromptLearner` without its fixed token buffers)."""

    def __init__(self, ctx_CD: torch.Tensor, depth: int, d_vision: int):
        super().__init__()
        n_ctx, d_text = ctx_CD.shape
        if depth < 1:
            raise PatchSAEError(f"MaPLe prompt depth must be at least 1, not {depth}")
        self.ctx = nn.Parameter(ctx_CD.clone().float())
        self.proj = nn.Linear(d_text, d_vision)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx, d_text) * 0.02) for _ in range(depth - 1)])
        single = nn.Linear(d_text, d_vision)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @property
    def depth(self) -> int:
        return 1 + len(self.compound_prompts_text)

    def text_prompt(self, i: int) -> torch.Tensor:
        """(n_ctx, d_text) prompt entering text block i (i < depth)."""
        return self.ctx if i == 0 else self.compound_prompts_text[i - 1]

    def vision_prompt(self, i: int) -> torch.Tensor:
        """(n_ctx, d_vision) prompt entering vision block i (i < depth), projected from the text prompt."""
        if i == 0:
            return self.proj(self.ctx)
        return self.compound_prompt_projections[i - 1](self.compound_prompts_text[i - 1])


class MapleModel(ClipModel):
    """A `ClipModel` whose towers run with MaPLe prompts: the same public methods (preprocess, layout,
    block_output, finish_from, replace_block_output, image_features, text_features, text_head, logits), so every
    analysis runs on it unchanged. The HF model is shared with the frozen CLIP it was built from, never copied.

    text_features(texts) embeds each text in the learnt prompt ("<ctx> <rest of ctx_init> <text>."); text_head
    ignores templates, the learnt context being the template."""

    def __init__(self, clip: ClipModel, prompts: MaplePrompts, ctx_init: str, name: str):
        super().__init__(clip.hf, clip.tokenizer, clip.preprocess, name, (f"{ctx_init} {{}}.",))
        self.base = clip
        self.cfg = MapleConfig(prompts.n_ctx, prompts.depth, ctx_init)  # n_ctx and depth: the prompts' own
        self.prompts = prompts.to(clip.device)
        check_prompts(clip, prompts)

    @property
    def depth(self) -> int:
        return self.prompts.depth

    def layout(self) -> TokenLayout:
        base = self.base.layout()
        return TokenLayout(n_cls=base.n_cls, n_prompt=self.prompts.n_ctx, grid=base.grid)

    # ---- vision --------------------------------------------------------------------------------------------
    def _embed(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        h_BTD = self.vision.embeddings(pixels_BCHW.to(self.device))
        p_BND = self.prompts.vision_prompt(0).expand(len(h_BTD), -1, -1)
        return self.vision.pre_layrnorm(torch.cat([h_BTD[:, :1], p_BND, h_BTD[:, 1:]], 1))

    def _run_blocks(self, h_BTD: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        n = self.prompts.n_ctx
        for i in range(start, stop):
            if 1 <= i < self.depth:  # deeper compound prompt: replaces what the prompt rows became
                p_BND = self.prompts.vision_prompt(i).expand(len(h_BTD), -1, -1)
                h_BTD = torch.cat([h_BTD[:, :1], p_BND, h_BTD[:, 1 + n:]], 1)
            h_BTD = self.blocks[i](h_BTD, None)
        return h_BTD

    def plain_blocks_start(self) -> int:
        return self.depth  # compound prompts are injected before blocks 1..depth-1, none from block depth on

    def image_features_grad(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """Image embeddings with gradients flowing to the prompts (training)."""
        return self._finish(self._embed(pixels_BCHW), 0)

    # ---- text ----------------------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings of the learnt prompts, with gradients (training and inference)."""
        tm, n = self.hf.text_model, self.prompts.n_ctx
        tok = self.tokenizer([f"{self.cfg.ctx_init} {t}." for t in texts], padding=True, truncation=True,
                             return_tensors="pt")
        ids_NT = tok["input_ids"].to(self.device)
        N, T = ids_NT.shape
        emb_NTD = tm.embeddings.token_embedding(ids_NT)
        emb_NTD = torch.cat([emb_NTD[:, :1], self.prompts.text_prompt(0).expand(N, -1, -1), emb_NTD[:, 1 + n:]], 1)
        h_NTD = emb_NTD + tm.embeddings.position_embedding(torch.arange(T, device=self.device))
        mask_11TT = torch.full((T, T), torch.finfo(h_NTD.dtype).min, device=self.device).triu(1)[None, None]
        for i, layer in enumerate(tm.encoder.layers):
            if 1 <= i < self.depth:
                p_NCD = self.prompts.text_prompt(i).expand(N, -1, -1)
                h_NTD = torch.cat([h_NTD[:, :1], p_NCD, h_NTD[:, 1 + n:]], 1)
            h_NTD = layer(h_NTD, mask_11TT)
        h_NTD = tm.final_layer_norm(h_NTD)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        # pool at the first end-of-text token (= argmax for CLIP's BPE, whose end-of-text has the largest id)
        pos_N = (ids_NT == eos).int().argmax(-1) if eos is not None else ids_NT.argmax(-1)
        return self.hf.text_projection(h_NTD[torch.arange(N, device=self.device), pos_N])

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.encode_text(list(prompts[i: i + batch_size]))
                          for i in range(0, len(prompts), batch_size)])

    @torch.no_grad()
    def text_head(self, class_names: Sequence[str], templates: Sequence[str] | None = None,
                  renormalise: bool = True) -> torch.Tensor:
        """Classifier (classes, E): the normalised learnt-prompt embedding of each class name (one prompt per
        class, so the head is unit-norm with or without `renormalise`)."""
        return F.normalize(self.text_features(list(class_names)), dim=-1)


# ---- building, saving, loading ------------------------------------------------------------------------------

def check_prompts(clip: ClipModel, prompts: MaplePrompts) -> None:
    d_text = clip.hf.config.text_config.hidden_size
    n_text = len(clip.hf.text_model.encoder.layers)
    if prompts.ctx.shape[1] != d_text or prompts.proj.out_features != clip.d_model:
        raise PatchSAEError(f"MaPLe prompts are for text width {prompts.ctx.shape[1]} and vision width "
                            f"{prompts.proj.out_features}; {clip.name} has {d_text} and {clip.d_model}")
    if prompts.depth > min(clip.n_layers, n_text):
        raise PatchSAEError(f"MaPLe prompt depth {prompts.depth} exceeds {clip.name}'s blocks "
                            f"(vision {clip.n_layers}, text {n_text})")


def init_context(clip: ClipModel, n_ctx: int, ctx_init: str) -> torch.Tensor:
    """Token embeddings of tokens 1..n_ctx of `ctx_init` (token 0 is start-of-text)."""
    ids = clip.tokenizer([ctx_init], return_tensors="pt")["input_ids"][0]
    words = ids[1:-1]  # without start- and end-of-text
    if len(words) < n_ctx:
        raise PatchSAEError(f"ctx_init {ctx_init!r} has {len(words)} tokens, fewer than n_ctx = {n_ctx}")
    with torch.no_grad():
        return clip.hf.text_model.embeddings.token_embedding(words[:n_ctx].to(clip.device)).detach().cpu()


def build_maple(clip: ClipModel, cfg: MapleConfig = MapleConfig(), seed: int = 0) -> MapleModel:
    """Fresh prompts for `clip` (deterministic given the seed)."""
    n_text = len(clip.hf.text_model.encoder.layers)
    depth = cfg.depth if cfg.depth is not None else default_depth(clip.n_layers, n_text)
    ctx = init_context(clip, cfg.n_ctx, cfg.ctx_init)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        prompts = MaplePrompts(ctx, depth, clip.d_model)
    return MapleModel(clip, prompts, cfg.ctx_init, f"{clip.name}+maple")


def save_prompts(folder: str | Path, model: MapleModel, meta: dict | None = None) -> Path:
    """folder/prompts.safetensors (official parameter names) + folder/config.json (written last)."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.prompts.state_dict().items()}
    digest = write_safetensors(folder / PROMPTS_FILE, tensors, {"format": FORMAT})
    write_json(folder / CONFIG_FILE, {"format": FORMAT, "model": model.base.name, "weights_digest": digest,
                                      **asdict(model.cfg),
                                      "d_text": int(model.prompts.ctx.shape[1]), "d_vision": model.d_model,
                                      **(meta or {})})
    return folder


def prompts_from_state_dict(sd: dict[str, torch.Tensor]) -> MaplePrompts:
    """MaplePrompts from tensors named as in the official code (without the `prompt_learner.` prefix)."""
    if "ctx" not in sd:
        raise PatchSAEError("no MaPLe context tensor 'ctx' (or 'prompt_learner.ctx') in the checkpoint")
    ctx = sd["ctx"].float()
    if ctx.dim() != 2:
        raise PatchSAEError(f"MaPLe 'ctx' must be (n_ctx, width), got shape {tuple(ctx.shape)}")
    n_deep = len([k for k in sd if k.startswith("compound_prompts_text.")])
    n_proj = len({k.rsplit(".", 1)[0] for k in sd if k.startswith("compound_prompt_projections.")})
    if n_deep != n_proj:
        raise PatchSAEError(f"checkpoint has {n_deep} compound text prompts but {n_proj} projections")
    if "proj.weight" not in sd or sd["proj.weight"].dim() != 2:
        raise PatchSAEError("no MaPLe projection 'proj.weight' (a matrix) in the checkpoint")
    bad = sorted(k for k, v in sd.items() if not (v.is_floating_point() and torch.isfinite(v).all()))
    if bad:
        raise PatchSAEError(f"MaPLe checkpoint tensors {bad[:5]} are not finite floating-point values")
    prompts = MaplePrompts(ctx, 1 + n_deep, sd["proj.weight"].shape[0])
    want = prompts.state_dict()
    missing = sorted(set(want) - set(sd))
    unknown = sorted(set(sd) - set(want))
    if missing or unknown:
        raise PatchSAEError(f"MaPLe checkpoint keys do not match: missing {missing[:5]}, unexpected {unknown[:5]}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise PatchSAEError(f"MaPLe checkpoint tensor {k} has shape {tuple(sd[k].shape)}, "
                                f"expected {tuple(v.shape)}")
    prompts.load_state_dict({k: sd[k].float() for k in want})
    return prompts


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The prompt tensors of an official MaPLe checkpoint (`model.pth.tar-N`, `model-best.pth.tar`: a dict with
    'state_dict', 'epoch', 'optimizer', 'scheduler', ...), loaded with torch.load(weights_only=True). Globals
    beyond tensors (scheduler objects) are bound to an inert stand-in first, so nothing in the file is executed.
    Keys are returned without the 'prompt_learner.' (and any 'module.') prefix; token_prefix/token_suffix, the
    training class names' fixed token embeddings, are dropped as the official loader does, and so are any frozen
    CLIP weights saved beside the prompts."""
    obj = load_pickled(path, "MaPLe checkpoint")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise PatchSAEError(f"{path}: expected a dict with a 'state_dict', got {type(obj).__name__}")
    out = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(OFFICIAL_PREFIX) and torch.is_tensor(value):
            name = key[len(OFFICIAL_PREFIX):]
            if name not in OFFICIAL_DROPPED:
                out[name] = value
    if not out:
        raise PatchSAEError(f"{path}: no '{OFFICIAL_PREFIX}*' tensors; not a MaPLe checkpoint")
    return out


def load_adapted(clip: ClipModel, prompts_path: str | Path, ctx_init: str | None = None) -> MapleModel:
    """The adapted model: `clip` with the MaPLe prompts at `prompts_path`, which is a folder written by
    `patchsae adapt` (prompts.safetensors + config.json), such a prompts.safetensors file, or an official MaPLe
    checkpoint (model.pth.tar-N). `ctx_init`: the phrase the prompts were trained from (default: the saved
    config's, else the official "a photo of a")."""
    from safetensors.torch import load_file

    path = Path(prompts_path)
    if path.is_dir():
        path = path / PROMPTS_FILE
    if not path.exists():
        raise PatchSAEError(f"MaPLe prompts {prompts_path}: no such file or folder (expected {PROMPTS_FILE} "
                            "from `patchsae adapt`, or an official model.pth.tar-N)")
    meta = {}
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise PatchSAEError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
        meta = read_config(path.parent)
        if meta.get("weights_digest") not in (None, file_digest(path)):
            raise PatchSAEError(f"{path} is not the file {path.parent / CONFIG_FILE} was saved with (a save was "
                                "cut short, or files were mixed); run adapt again")
        if meta.get("model") not in (None, clip.name):
            raise PatchSAEError(f"the prompts in {path.parent} were trained on {meta['model']}, not {clip.name}")
        source = f"{clip.name}+maple:{path.parent}"
    else:
        sd = load_official_checkpoint(path)
        source = f"{clip.name}+maple:{path}"
    prompts = prompts_from_state_dict(sd)
    init = ctx_init or meta.get("ctx_init") or MapleConfig.ctx_init
    return MapleModel(clip, prompts, init, source)


def file_digest(path: Path) -> str | None:
    """The digest write_safetensors put in the header (the file was already read, so it opens)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("digest")


def read_config(folder: str | Path) -> dict:
    """The config.json `patchsae adapt` wrote beside the prompts ({} for official checkpoints)."""
    cfg_file = Path(folder) / CONFIG_FILE
    if not (Path(folder).is_dir() and cfg_file.exists()):
        return {}
    meta = read_json_file(cfg_file, "MaPLe prompt config")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k, ""), str)
                                             for k in ("model", "ctx_init", "weights_digest")):
        raise PatchSAEError(f"{cfg_file}: damaged MaPLe prompt config (expected an object with text 'model', "
                            "'ctx_init' and 'weights_digest')")
    return meta
