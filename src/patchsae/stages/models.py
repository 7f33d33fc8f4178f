"""`patchsae models`: the model sources that --model accepts, and the backbone families with what each supports."""

from __future__ import annotations

NAME = "models"
HELP = "list the model sources that --model accepts"
OPTIONS = ()

MODEL_SOURCES = (
    ("embedded", "the Fashion-MNIST CLIP shipped in this package (default; runs offline)"),
    ("FOLDER", "a local Hugging Face folder of one of the families below (config.json, weights, tokenizer)"),
    ("HUB_ID", "a Hugging Face hub id such as openai/clip-vit-base-patch16 (needs the hub or a filled cache)"),
    ("FILE.pt|.pth|.bin|.safetensors", "a ViT checkpoint in OpenAI's original layout (also open_clip's "
                                       "OpenAI-style ViTs, --act gelu|quick_gelu); CLIP's vocab.json + "
                                       "merges.txt beside it give text"),
)


def format_listing() -> str:
    from patchsae.models.load import FAMILIES

    width = max(len(name) for name, _ in MODEL_SOURCES)
    lines = [f"{name:<{width}}  {what}" for name, what in MODEL_SOURCES]
    rows = [("family", "config model_type", "tokens", "classifies with")]
    rows += [(f.name, ", ".join(f.model_types), f.tokens, f.head) for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += [""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines)


def cli(args) -> None:
    print(format_listing())
