"""OpenAI's original CLIP checkpoint layout (`visual.transformer.resblocks.N...`), converted to a Hugging Face
`CLIPModel`.

The layout carries no config: like OpenAI's own `build_model`, every size is read from tensor shapes. open_clip
saves its ViTs in the same layout, both the QuickGELU ones (OpenAI's activation) and the plain-GELU ones (most
LAION/DataComp models); shapes cannot tell them apart, so `resolve_act` decides: an explicit `act`, else an
open_clip model config JSON beside the file, else a known name, else QuickGELU with one line saying so. Only ViT
towers are supported; the ResNet CLIPs (`visual.layer1...`) have no patch tokens to hook.
"""

from __future__ import annotations

import json
import math
import re
import sys
import zipfile
from pathlib import Path

import torch

from patchsae import PatchSAEError
from patchsae.pickles import load_pickled
from patchsae.utils import one_line

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HEAD_WIDTH = 64  # OpenAI: heads = width // 64 in both towers
IGNORED = ("input_resolution", "context_length", "vocab_size")  # scalars some files carry
ACTS = ("quick_gelu", "gelu")
OPENAI_RELEASES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336px")  # OpenAI's own file names: QuickGELU

# sub-keys of one residual block: OpenAI name -> HF name (in_proj is split into q, k, v separately)
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_VISION = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _n_blocks(sd: dict, prefix: str) -> int:
    """Blocks in a tower: highest index + 1, so that a gap shows up as missing keys rather than a short model."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _require(sd: dict, keys) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise PatchSAEError(f"not an OpenAI-layout CLIP state dict: missing {_few(missing)}")


def _check_vit(sd: dict) -> None:
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise PatchSAEError("this is a ResNet CLIP checkpoint; only ViT checkpoints are supported")


def _open_clip_config(path: Path) -> dict | None:
    """The open_clip model config beside `path` (open_clip_config.json as on the hub, with its "model_cfg", or
    <stem>.json as in open_clip's model_configs), or None."""
    for cand in (path.parent / "open_clip_config.json", path.with_suffix(".json")):
        if cand.is_file():
            try:
                cfg = json.loads(cand.read_text())
            except (OSError, ValueError) as exc:
                raise PatchSAEError(f"{cand}: not readable JSON ({exc})") from None
            cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
            if isinstance(cfg, dict) and "vision_cfg" in cfg:
                return cfg | {"_file": str(cand)}
    return None


def resolve_act(path: str | Path, act: str | None = None) -> str:
    """The MLP activation of an OpenAI-layout checkpoint: `act` if given; else the open_clip config beside the
    file ("quick_gelu": true or not); else the name (open_clip's "-quickgelu" models and OpenAI's own release
    names use QuickGELU); else QuickGELU, saying so in one line on stderr."""
    path = Path(path)
    if act is not None:
        if act not in ACTS:
            raise PatchSAEError(f"act must be one of {', '.join(ACTS)}, not {act!r}")
        return act
    cfg = _open_clip_config(path)
    if cfg is not None:
        vis, txt = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
        odd = [k for k in ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre") if vis.get(k)]
        odd += [k for k in ("hf_model_name",) if txt.get(k)] + (["pool_type"] if vis.get("pool_type") not in
                                                                 (None, "tok") else [])
        if odd:
            raise PatchSAEError(f"{cfg['_file']}: an open_clip model with {', '.join(odd)} is not an OpenAI-style "
                                "ViT CLIP; only those convert")
        return "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    if "quickgelu" in path.stem.lower().replace("_", "").replace("-", "") or path.stem in OPENAI_RELEASES:
        return "quick_gelu"
    print(f"patchsae: {path.name}: no open_clip config beside it and no known name; assuming QuickGELU "
          "(OpenAI's); pass act='gelu' for GELU-trained open_clip models (most LAION/DataComp)", file=sys.stderr)
    return "quick_gelu"


def config_from_state_dict(sd: dict, act: str = "quick_gelu"):
    """A `CLIPConfig` derived from tensor shapes alone (works on meta or empty tensors); `act` is the MLP
    activation of both towers, which shapes cannot tell. Shapes that describe no ViT CLIP (a 0-d tensor where a
    matrix belongs, widths that are no multiple of the 64-wide heads) are one error line."""
    try:
        return _config_from_shapes(sd, act)
    except (IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise PatchSAEError(f"tensor shapes do not describe a ViT CLIP ({one_line(exc)})") from None


def _config_from_shapes(sd: dict, act: str):
    from transformers import CLIPConfig

    _check_vit(sd)
    _require(sd, ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                  "positional_embedding", "token_embedding.weight", "ln_final.weight",
                  "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight"])
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = round(math.sqrt(n_pos - 1))
    if grid * grid + 1 != n_pos:
        raise PatchSAEError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square patch grid")
    text_width = sd["ln_final.weight"].shape[0]
    if not (width > 0 and text_width > 0 and width % HEAD_WIDTH == 0 and text_width % HEAD_WIDTH == 0):
        raise ValueError(f"widths {width} and {text_width} must be positive multiples of {HEAD_WIDTH}")
    vocab = sd["token_embedding.weight"].shape[0]
    if act not in ACTS:
        raise PatchSAEError(f"act must be one of {', '.join(ACTS)}, not {act!r}")
    act = dict(hidden_act=act, layer_norm_eps=1e-5)
    return CLIPConfig(
        vision_config=dict(
            hidden_size=width, num_attention_heads=width // HEAD_WIDTH, patch_size=patch, image_size=patch * grid,
            num_hidden_layers=_n_blocks(sd, "visual.transformer.resblocks."),
            intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], **act),
        text_config=dict(
            hidden_size=text_width, num_attention_heads=text_width // HEAD_WIDTH, vocab_size=vocab,
            max_position_embeddings=sd["positional_embedding"].shape[0],
            num_hidden_layers=_n_blocks(sd, "transformer.resblocks."),
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            # CLIP's BPE puts <|startoftext|>, <|endoftext|> last; padding uses <|endoftext|> too
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **act),
        projection_dim=sd["text_projection"].shape[1],
    )


def _block_keys(sd: dict) -> dict[str, str]:
    """OpenAI block key -> HF key for every block both towers should have (in_proj: the attention module)."""
    out = {}
    for src, dst in _TOWERS:
        for i in range(_n_blocks(sd, src)):
            out.update({f"{src}{i}.{k}": f"{dst}{i}.{v}" for k, v in _BLOCK.items()})
            out.update({f"{src}{i}.{k}": f"{dst}{i}.self_attn" for k in _IN_PROJ})
    return out


def convert_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    """Rename OpenAI keys to `CLIPModel` keys: split in_proj into q/k/v, transpose the two projections,
    and cast to float32 (OpenAI ships fp16 weights)."""
    _check_vit(sd)
    names = {**_VISION, **_TEXT, **_TRANSPOSED, **_block_keys(sd)}
    sd = {k: v for k, v in sd.items() if k not in IGNORED}
    missing, unknown = set(names) - set(sd), set(sd) - set(names)
    if missing or unknown:
        parts = [f"{what} {_few(sorted(keys))}" for what, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise PatchSAEError(f"not an OpenAI-layout ViT CLIP state dict: {'; '.join(parts)}")
    out = {}
    for key, value in sd.items():
        value = value.float() if value.is_floating_point() else value
        dst = names[key]
        if key in _TRANSPOSED:
            out[dst] = value.T.contiguous()
        elif key.endswith(_IN_PROJ):
            kind = "weight" if key.endswith("weight") else "bias"
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{dst}.{name}_proj.{kind}"] = part.contiguous()
        else:
            out[dst] = value
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never unpickling arbitrary objects; unwraps `state_dict`/`model` nesting
    and a DataParallel `module.` prefix."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            raise PatchSAEError(
                f"{path} is a TorchScript archive (OpenAI's official .pt files are), which can run code when "
                "loaded; convert it once where you trust it: sd = torch.jit.load(path, map_location='cpu')"
                ".state_dict(), then safetensors.torch.save_file(sd, 'clip.safetensors'), and pass that file")
        else:
            sd = load_pickled(path, "CLIP checkpoint")
    except PatchSAEError:
        raise
    except Exception as exc:  # truncated or foreign safetensors files fail in many library-specific ways
        raise PatchSAEError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PatchSAEError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class MissingTokenizer:
    """Stands in for a tokenizer when none was found, so the image side works and text fails with one line."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint

    def __call__(self, *args, **kwargs):
        raise PatchSAEError(
            f"{self.checkpoint} has no tokenizer, so text features are unavailable: put CLIP's vocab.json and "
            "merges.txt next to it (any Hugging Face CLIP folder has them), or pass a tokenizer folder")


def load_tokenizer(checkpoint: Path, vocab_size: int, folder: str | Path | None = None):
    """CLIP's BPE tokenizer from `folder` (any HF tokenizer folder) or from vocab.json + merges.txt beside the
    checkpoint; None when there is neither. Never downloads."""
    if folder is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PatchSAEError(f"{folder}: not a loadable tokenizer folder ({str(exc).splitlines()[0]})") from None
    else:
        vocab, merges = checkpoint.parent / "vocab.json", checkpoint.parent / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            return None
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    if len(tok) > vocab_size:
        raise PatchSAEError(f"the tokenizer has {len(tok)} tokens but {checkpoint} embeds only {vocab_size}")
    return tok


def load_openai_checkpoint(path: str | Path, device: str = "cpu", tokenizer: str | Path | None = None,
                           act: str | None = None):
    """(`CLIPModel`, tokenizer or None) from an OpenAI-layout checkpoint file; `tokenizer` is an optional
    tokenizer folder, otherwise vocab.json + merges.txt beside the file are used when present; `act`:
    "quick_gelu" or "gelu" (None: `resolve_act` decides)."""
    from transformers import CLIPModel

    path = Path(path)
    sd = read_state_dict(path)
    cfg = config_from_state_dict(sd, resolve_act(path, act))
    weights = convert_state_dict(sd)
    tok = load_tokenizer(path, cfg.text_config.vocab_size, tokenizer)
    if tok is not None:  # HF pools the text tower at the first end-of-text token
        cfg.text_config.eos_token_id = cfg.text_config.pad_token_id = tok.eos_token_id
        cfg.text_config.bos_token_id = tok.bos_token_id
    from patchsae.models.load import ATTENTION

    model = CLIPModel._from_config(cfg, attn_implementation=ATTENTION)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # shapes that disagree with the derived config
        reason = str(exc).strip().splitlines()[-1].strip()[:300]
        raise PatchSAEError(f"{path}: tensor shapes do not fit one CLIP ({reason})") from None
    return model.to(device).eval(), tok
