"""Image preprocessing as each model specifies it, without torchvision: read from the model folder's own
`preprocessor_config.json` (the fields Hugging Face's CLIP, SigLIP and BiT/DINOv2 image processors use) and
applied the way their PIL backend applies them:

  RGB (transparency composited onto white) -> resize (short side to `shortest_edge`, the long side
  int(shortest_edge * long / short); or to a fixed height x width) with PIL's filter `resample` -> centre crop
  (top = (H - size) // 2) -> x * rescale_factor -> (x - mean) / std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from patchsae import PatchSAEError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# what each HF image processor does for keys its config leaves out (its class defaults in transformers)
_DEFAULTS = {
    "CLIPImageProcessor": dict(size={"shortest_edge": 224}, crop=True, crop_size=224, mean=CLIP_MEAN, std=CLIP_STD),
    "BitImageProcessor": dict(size={"shortest_edge": 224}, crop=True, crop_size=224, mean=CLIP_MEAN, std=CLIP_STD),
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, crop=False, crop_size=None, mean=HALF,
                                 std=HALF),
}


MAX_RESIZE_FACTOR = 16  # a resize to more than this many crops' worth of pixels takes the crop region only


@dataclass(frozen=True)
class Preprocess:
    """PIL images -> pixels (B, 3, size, size). `Preprocess(size, mean, std)` is OpenAI CLIP's rule: short side
    to `size` (bicubic), centre crop `size`."""

    size: int  # side of the square the model sees (the crop, or the fixed resize when there is no crop)
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean subtracted after rescaling
    std: tuple[float, float, float] = CLIP_STD  # per-channel divisor after subtracting the mean
    shortest_edge: int | None = None  # resize the short side to this (None: to `size`), keeping the aspect ratio
    fixed_side: int | None = None  # resize to fixed_side x fixed_side instead, aspect not kept (SigLIP)
    center_crop: bool = True  # centre-crop size x size after resizing
    resample: int = Image.BICUBIC  # PIL resampling filter (3 bicubic, 2 bilinear)
    rescale_factor: float = 1 / 255  # uint8 -> [0, 1]
    normalize: bool = True  # apply mean/std

    def _crop_region_resized(self, img: Image.Image, new_wh: tuple[int, int]) -> Image.Image:
        """Only the centre crop's source region, resized straight to size x size: for images whose full resize
        would be huge (a 1 KB PNG strip of 1 x 200,000 pixels would become 28 x 5.6 M). Within one level of 255
        of the full resize-then-crop on a few pixels; never used for ordinary aspect ratios."""
        w, h = img.size
        left, top = (new_wh[0] - self.size) // 2, (new_wh[1] - self.size) // 2
        sx, sy = w / new_wh[0], h / new_wh[1]
        return img.resize((self.size, self.size), self.resample,
                          box=(left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy))

    def resized(self, img: Image.Image) -> Image.Image:
        """RGB, resized and cropped, still uint8."""
        img = to_rgb(img)
        if self.fixed_side:
            img = img.resize((self.fixed_side, self.fixed_side), self.resample)
        else:
            short = self.shortest_edge or self.size
            w, h = img.size
            if w <= h:
                new_wh = (short, int(short * h / w))
            else:
                new_wh = (int(short * w / h), short)
            if self.center_crop and new_wh[0] * new_wh[1] > MAX_RESIZE_FACTOR * self.size * self.size:
                return self._crop_region_resized(img, new_wh)
            img = img.resize(new_wh, self.resample)
        if self.center_crop:
            w, h = img.size
            if w < self.size or h < self.size:
                raise PatchSAEError(f"image resized to {w}x{h} is smaller than the {self.size}x{self.size} crop")
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        if img.size != (self.size, self.size):
            raise PatchSAEError(f"preprocessing made a {img.size[0]}x{img.size[1]} image, not "
                                f"{self.size}x{self.size}")
        return img

    def image(self, img: Image.Image) -> torch.Tensor:
        """One image -> (3, size, size) float32."""
        x_HWC = np.asarray(self.resized(img), dtype=np.float64) * self.rescale_factor
        if self.normalize:
            x_HWC = (x_HWC - np.asarray(self.mean)) / np.asarray(self.std)
        return torch.from_numpy(x_HWC.astype(np.float32)).permute(2, 0, 1).contiguous()

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.image(im) for im in images])


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as HF's image processors do)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _side(value, what: str) -> int:
    """A square side from an int or a {"height", "width"} dict; non-square sizes are refused."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and value.get("height") == value.get("width"):
        return int(value["height"])
    raise PatchSAEError(f"preprocessor_config.json: {what} {value!r} is not supported (square sizes only)")


def preprocess_from_config(cfg: dict) -> Preprocess:
    """A `Preprocess` from a preprocessor_config.json dict; keys it leaves out take the named image processor's
    class defaults, as in transformers (so a CLIP config without "size" resizes the short side to 224)."""
    kind = cfg.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
    if kind not in _DEFAULTS:
        raise PatchSAEError(f"preprocessor_config.json: image processor {kind!r} is not supported "
                            f"(supported: {', '.join(sorted(_DEFAULTS))})")
    d = _DEFAULTS[kind]
    if not cfg.get("do_resize", True):
        raise PatchSAEError("preprocessor_config.json: do_resize false is not supported (images of any size "
                            "must become one input size)")
    size = cfg.get("size", d["size"])
    if isinstance(size, int):  # legacy configs: one int is the short side
        size = {"shortest_edge": size}
    crop = bool(cfg.get("do_center_crop", d["crop"]))
    if "shortest_edge" in size:
        if "longest_edge" in size:
            raise PatchSAEError("preprocessor_config.json: size with longest_edge is not supported")
        short, fixed = int(size["shortest_edge"]), None
    else:
        short, fixed = None, _side(size, "size")
    if crop:
        side = _side(cfg.get("crop_size", d["crop_size"]), "crop_size")
    elif fixed is not None:
        side = fixed
    else:
        raise PatchSAEError("preprocessor_config.json: a shortest_edge resize without a centre crop gives "
                            "images of varying shape; not supported")
    return Preprocess(
        size=side, mean=tuple(cfg.get("image_mean", d["mean"])), std=tuple(cfg.get("image_std", d["std"])),
        shortest_edge=short, fixed_side=fixed, center_crop=crop, resample=int(cfg.get("resample", Image.BICUBIC)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        normalize=bool(cfg.get("do_normalize", True)))


def preprocess_from_folder(folder: str | Path, image_size: int, default: Preprocess | None = None) -> Preprocess:
    """The folder's preprocessor_config.json, else `default` (else OpenAI CLIP's rule at `image_size`)."""
    cfg_file = Path(folder) / "preprocessor_config.json"
    if not cfg_file.exists():
        return default or Preprocess(image_size)
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as exc:
        raise PatchSAEError(f"{cfg_file}: not readable JSON ({exc})") from None
    return preprocess_from_config(cfg)

