"""Patch maps: where inside one image a latent fires.

A latent's activations at the patch tokens form the model's patch grid (e.g. 14x14 for ViT-B/16); upsampled
bilinearly to the model's input size they are drawn as a heatmap over the image, or as a segmentation
(the image multiplied by the activation normalised to [0, 1]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchsae import PatchSAEError
from patchsae.data.base import LabelledImages, iter_batches
from patchsae.models.clip import ClipModel, TokenLayout
from patchsae.sae.model import SAE


def load_image(spec: str, ds: LabelledImages | None, model: ClipModel) -> tuple[torch.Tensor, int | None, str]:
    """(pixels_CHW, label or None, description) for a dataset index or an image file path."""
    if spec.isdigit():
        if ds is None:
            raise PatchSAEError(f"image {spec}: a dataset index needs a dataset")
        i = int(spec)
        if not 0 <= i < len(ds):
            raise PatchSAEError(f"image index {i} is outside {ds.name}/{ds.split} (0..{len(ds) - 1})")
        img, label = ds.load(i)
        return model.preprocess([img])[0], label, f"{ds.name}/{ds.split}[{i}]"
    path = Path(spec)
    try:
        with Image.open(path) as im:
            im.load()
            img = im.copy()
    except (OSError, ValueError) as exc:
        raise PatchSAEError(f"cannot read image {spec}: {exc}") from None
    return model.preprocess([img])[0], None, path.name


def load_pixels(model: ClipModel, ds: LabelledImages, indices: list[int]) -> dict[int, torch.Tensor]:
    """Preprocessed images by dataset index (reference images); unreadable ones are left out."""
    out = {}
    for pixels, _, idx in iter_batches(ds, model.preprocess, 256, indices):
        out.update({int(i): p for i, p in zip(idx, pixels)})
    return out


@torch.no_grad()
def image_activations(model: ClipModel, sae: SAE, pixels_CHW: torch.Tensor, layer: int) -> torch.Tensor:
    """Latent activations of one image at its image tokens (CLS first, then the patch grid): f_TS."""
    h_TD = model.block_output(pixels_CHW[None], layer)[0, model.layout().image_token_mask()]
    return sae.to(model.device).encode(h_TD).cpu()


def patch_grid(f_TS: torch.Tensor, layout: TokenLayout, latent: int) -> torch.Tensor:
    """One latent's activations on the patch grid, (rows, cols); f_TS holds CLS + patches."""
    if not 0 <= latent < f_TS.shape[1]:
        raise PatchSAEError(f"latent {latent} does not exist (the SAE has {f_TS.shape[1]})")
    return f_TS[layout.n_cls:, latent].reshape(layout.grid)


def upsample(map_hw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a patch grid to the image size (H, W)."""
    return F.interpolate(map_hw[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def display_image(pixels_CHW: torch.Tensor, model: ClipModel) -> np.ndarray:
    """The model's input image as float RGB in [0, 1], (H, W, 3): normalisation undone."""
    mean = torch.tensor(model.preprocess.mean)[:, None, None]
    std = torch.tensor(model.preprocess.std)[:, None, None]
    return (pixels_CHW.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def normalise(map_HW: torch.Tensor) -> np.ndarray:
    """Activation scaled to [0, 1] by its maximum (all zeros stays zeros)."""
    m = map_HW.clamp_min(0)
    return (m / m.max()).numpy() if m.max() > 0 else np.zeros(tuple(m.shape), dtype=np.float32)


def heatmap_overlay(image_HW3: np.ndarray, map_HW: torch.Tensor, opacity: float = 0.5,
                    cmap: str = "jet") -> np.ndarray:
    """The image blended with a colour-mapped, normalised activation map, (H, W, 3) in [0, 1]."""
    from matplotlib import colormaps

    heat_HW3 = colormaps[cmap](normalise(map_HW))[..., :3]
    return (1 - opacity) * image_HW3 + opacity * heat_HW3


def segmentation(image_HW3: np.ndarray, map_HW: torch.Tensor) -> np.ndarray:
    """The image multiplied by the normalised activation: only where the latent fires stays visible."""
    return image_HW3 * normalise(map_HW)[..., None]


def top_latents_of_image(f_TS: torch.Tensor, n: int = 5) -> tuple[list[int], list[float]]:
    """Latents with the largest image-level activation (mean over CLS + patches)."""
    vals, ids = f_TS.mean(0).topk(min(n, f_TS.shape[1]))
    return ids.tolist(), vals.tolist()


def top_latents_of_patch(f_TS: torch.Tensor, layout: TokenLayout, row: int, col: int, n: int = 5
                         ) -> tuple[list[int], list[float]]:
    """Latents with the largest activation at one patch (row, col of the grid)."""
    rows, cols = layout.grid
    if not (0 <= row < rows and 0 <= col < cols):
        raise PatchSAEError(f"patch ({row}, {col}) is outside the {rows}x{cols} grid")
    vals, ids = f_TS[layout.n_cls + row * cols + col].topk(min(n, f_TS.shape[1]))
    return ids.tolist(), vals.tolist()


def write_patch_map_figure(path: str | Path, image_HW3: np.ndarray, map_hw: torch.Tensor, title: str) -> None:
    """Three panels: the image, the heatmap overlay, the segmentation."""
    from patchsae.analysis.figures import _plt, _save

    plt = _plt()
    map_HW = upsample(map_hw, image_HW3.shape[:2])
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.9))
    for ax, img, name in zip(axes, (image_HW3, heatmap_overlay(image_HW3, map_HW), segmentation(image_HW3, map_HW)),
                             ("image", f"heatmap (max {float(map_hw.max()):.2f})", "segmentation")):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
