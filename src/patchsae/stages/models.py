"""`patchsae models`: the model sources that --model accepts."""

from __future__ import annotations

NAME = "models"
HELP = "list the model sources that --model accepts"
OPTIONS = ()

MODEL_SOURCES = (
    ("embedded", "the Fashion-MNIST CLIP shipped in this package (default; runs offline)"),
    ("FOLDER", "a local Hugging Face CLIP folder (config.json, weights, tokenizer)"),
    ("HUB_ID", "a Hugging Face hub id such as openai/clip-vit-base-patch16 (needs the hub or a filled cache)"),
    ("FILE.pt|.pth|.bin|.safetensors", "a ViT checkpoint in OpenAI's original layout (also open_clip's "
                                       "OpenAI-style ViTs); CLIP's vocab.json + merges.txt beside it give text"),
)


def format_listing() -> str:
    width = max(len(name) for name, _ in MODEL_SOURCES)
    return "\n".join(f"{name:<{width}}  {what}" for name, what in MODEL_SOURCES)


def cli(args) -> None:
    print(format_listing())
