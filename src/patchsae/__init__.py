"""patchsae: sparse autoencoders on the patch tokens of CLIP vision transformers (PatchSAE, ICLR 2025)."""

__version__ = "0.1.0"


class PatchSAEError(Exception):
    """An error caused by the user's input; the CLI prints its message as one line and exits non-zero."""
