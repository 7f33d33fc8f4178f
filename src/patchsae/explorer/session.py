"""What the explorer knows about one run, and every computation its web app and static report ask for.

An `Explorer` holds the run's CLIP, SAE, `analyze` statistics (DIR/analysis) and dataset, plus optionally a second
CLIP-compatible model (an adapted one, e.g. MaPLe) that the same SAE reads. It answers: the top latents of an
image and of each patch, a latent's patch map on any image, a latent's statistics and reference images, a
search over latents, and steering (scale one latent at the hooked block and finish the forward pass).

Images are referred to by an id the explorer hands out (`ds-<index>` for dataset images, a random hex id for
uploads); no client-given string is ever used as a filesystem path.
"""

from __future__ import annotations

import io
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from patchsae import PatchSAEError
from patchsae.analysis import kinds, patch_maps
from patchsae.analysis.latents import LOW_ENTROPY
from patchsae.data.base import ImageTooLarge, open_image
from patchsae.explorer.catalog import Catalog
from patchsae.models.classifier import TextClassifier
from patchsae.models.clip import ClipModel
from patchsae.runs import Run
from patchsae.runs.artefacts import open_run, open_run_dataset, require_analysis, sae_origin

STATIC_DIR = Path(__file__).parent / "static"  # the page's HTML/JS/CSS, shipped as package data
DISPLAY = 224  # pixels per side of the images and heatmaps the explorer draws
KINDS = ("heatmap", "segmentation", "image")


class NotAnImage(PatchSAEError):
    """An upload that is empty, too large in pixels, or not decodable as an image."""


class UnknownImage(KeyError):
    """An image id the explorer never handed out, or one it has since forgotten (it keeps the latest few)."""


@dataclass
class ImageEntry:
    """One image the explorer has seen: preprocessed pixels and, per model and filled on first use, the SAE code
    of its image tokens and its unhooked image embedding."""

    pixels_CHW: torch.Tensor
    label: int | None
    desc: str
    f_TS: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> (CLS + patches, d_sae)
    emb_1E: dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> (1, projection_dim)

    def nbytes(self, code_bytes: dict[str, int]) -> int:
        """Bytes held, counting the codes of a model not computed yet at their size `code_bytes[key]`: the
        entry's size once every model has read it, so the cache's byte budget never depends on what was viewed."""
        held = [self.pixels_CHW, *self.f_TS.values(), *self.emb_1E.values()]
        return (sum(t.numel() * t.element_size() for t in held)
                + sum(n for key, n in code_bytes.items() if key not in self.f_TS))


def split_common(base: Sequence[int], adapted: Sequence[int]) -> dict[str, list[int]]:
    """The reference demo's three groups of two top-latent lists: in both, only in the base model's, only in
    the adapted model's (each in its own list's order)."""
    a, b = set(adapted), set(base)
    return {"common": [l for l in base if l in a], "base_only": [l for l in base if l not in a],
            "adapted_only": [l for l in adapted if l not in b]}


def png_bytes(rgb_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb_HW3, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded file as a PIL image, or PatchSAEError (never a stack trace) if it is not a readable image."""
    if not data:
        raise NotAnImage("the uploaded file is empty")
    try:
        return open_image(io.BytesIO(data))
    except ImageTooLarge as exc:  # refused from the header, before decoding (decompression bombs)
        raise NotAnImage(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "not an image"
        raise NotAnImage(f"the uploaded file is not an image PIL can read ({type(exc).__name__})") from None


class Explorer(Catalog):
    """One run opened for exploring (its latents' statistics and listings: `Catalog`). All model work runs under
    one lock: steering installs a hook on the shared model, and no other forward pass may run while it is in
    place."""

    def __init__(self, run: Run, adapt: Callable[[ClipModel], ClipModel] | None = None, max_images: int = 64,
                 max_bytes: int = 1 << 30):
        """`adapt` turns the run's CLIP into an adapted model (e.g. MaPLe prompts) that the same SAE reads."""
        from patchsae.analysis.probe import classifier_for

        self.run = run
        cfg, model, sae, self.layer = open_run(run)
        self.sae = sae.to(model.device).eval()
        analysis = require_analysis(run, sae.cfg.d_sae)
        super().__init__(analysis.manifest, analysis.tensors, model.layout())
        self.models: dict[str, ClipModel] = {"base": model}
        adapted = adapt(model) if adapt is not None else None
        if adapted is not None:
            adapted.resolve_layer(self.layer)
            self.models["adapted"] = adapted
        opts = self.manifest.get("options") or {}
        try:
            self.ds = open_run_dataset(cfg, opts.get("dataset"), self.manifest["split"])
            self.ds_error = None
        except PatchSAEError as exc:  # uploads still work; reference images do not
            self.ds, self.ds_error = None, str(exc)
        self.classifiers = {"base": classifier_for(run, model, self.class_names, write=False)}
        if adapted is not None:
            self.classifiers["adapted"] = TextClassifier(adapted, adapted.text_head(self.class_names))
        self.heads = {k: c.head_CE for k, c in self.classifiers.items() if isinstance(c, TextClassifier)}
        self.sae_origin = sae_origin(run)
        self._images: OrderedDict[str, ImageEntry] = OrderedDict()
        self._max_images, self._max_bytes = max_images, max_bytes  # dense codes: 39 MB an image at ViT-B/16 x64
        self._code_bytes = {key: (m.layout().n_cls + m.layout().n_patches) * self.d_sae * self.sae.W_enc.element_size()
                            for key, m in self.models.items()}  # one image's codes per model, for the budget
        self.lock = threading.RLock()

    # ---- basic facts ----------------------------------------------------------------------------------------
    def info(self) -> dict:
        model = self.models["base"]
        layout = model.layout()
        m = self.manifest
        return {"run": self.run.path.name, "model": model.name, "layer": self.layer, "d_sae": self.d_sae,
                "grid": list(layout.grid), "input_size": model.preprocess.size, "display_size": DISPLAY,
                "class_names": self.class_names, "adapted": "adapted" in self.models,
                "adapted_model": self.models["adapted"].name if "adapted" in self.models else None,
                "dataset": {"name": m["dataset"], "split": m["split"], "analysed_images": m["n_images"],
                            "size": len(self.ds) if self.ds is not None else 0, "error": self.ds_error},
                "low_entropy_threshold": LOW_ENTROPY, "n_low_entropy": m.get("n_low_entropy"),
                "alive_latents": int((self.stats["fired_S"] > 0).sum()), "tau": m["tau"],
                "kinds": (m.get("kinds") or {}).get("counts") or self.kinds.counts(),
                "kind_thresholds": (m.get("kinds") or {}).get("thresholds"),
                "shown_by_default": list(kinds.SHOWN_BY_DEFAULT), "sae_origin": self.sae_origin,
                "classifier": self.classifiers["base"].kind}

    def check_model(self, key: str) -> ClipModel:
        if key not in self.models:
            raise PatchSAEError(f"no model {key!r} (this explorer has {', '.join(self.models)})")
        return self.models[key]

    # ---- images -------------------------------------------------------------------------------------------
    def _add(self, image_id: str, pixels_CHW: torch.Tensor | None, label: int | None, desc: str) -> str:
        """Remember an image (or touch one already known); its SAE codes are computed on first use (`codes`)."""
        with self.lock:
            if image_id not in self._images:
                self._images[image_id] = ImageEntry(pixels_CHW, label, desc)
            self._images.move_to_end(image_id)
            self._trim()
        return image_id

    def _trim(self) -> None:
        """Forget the least recently added images beyond the image count or byte budget (keeping at least one)."""
        with self.lock:
            while len(self._images) > 1 and (
                    len(self._images) > self._max_images
                    or sum(e.nbytes(self._code_bytes) for e in self._images.values()) > self._max_bytes):
                self._images.popitem(last=False)

    def codes(self, e: ImageEntry, key: str) -> torch.Tensor:
        """f_TS of an image under model `key`: the SAE code of its CLS + patch tokens, computed once."""
        with self.lock:
            if key not in e.f_TS:
                e.f_TS[key] = patch_maps.image_activations(self.models[key], self.sae, e.pixels_CHW, self.layer)
                self._trim()
            return e.f_TS[key]

    def embedding(self, e: ImageEntry, key: str) -> torch.Tensor:
        """The image's embedding under model `key` with no hook in place, computed once."""
        with self.lock:
            if key not in e.emb_1E:
                with torch.no_grad():
                    e.emb_1E[key] = self.models[key].image_features(e.pixels_CHW[None])
                self._trim()
            return e.emb_1E[key]

    def _pixels(self, img: Image.Image, what: str) -> torch.Tensor:
        try:
            return self.models["base"].preprocess([img])[0]
        except Exception as exc:  # noqa: BLE001 - odd modes or sizes PIL cannot convert: a bad image, not a crash
            raise NotAnImage(f"{what} cannot be converted to the model's input ({type(exc).__name__}: {exc})") from None

    def add_upload(self, data: bytes, filename: str = "upload") -> str:
        img = decode_upload(data)
        return self._add(secrets.token_hex(8), self._pixels(img, "the uploaded image"), None, filename[:80])

    def add_dataset(self, index: int) -> str:
        if self.ds is None:
            raise PatchSAEError(f"the run's dataset is not available here: {self.ds_error}")
        if not 0 <= index < len(self.ds):
            raise PatchSAEError(f"image index {index} is outside {self.ds.name}/{self.ds.split} (0..{len(self.ds) - 1})")
        image_id = f"ds-{index}"
        with self.lock:  # check and touch at once: no eviction may come between them
            if image_id in self._images:
                return self._add(image_id, None, None, "")
        try:
            img, label = self.ds.load(index)
        except Exception as exc:  # noqa: BLE001 - one unreadable file of the dataset
            raise PatchSAEError(f"cannot read image {index} of {self.ds.name}/{self.ds.split}: {exc}") from None
        return self._add(image_id, self._pixels(img, f"image {index}"), int(label),
                         f"{self.ds.name}/{self.ds.split}[{index}]")

    def entry(self, image_id: str) -> ImageEntry:
        with self.lock:
            if image_id not in self._images:
                if image_id.startswith("ds-") and image_id[3:].isdigit():
                    self.add_dataset(int(image_id[3:]))
                else:
                    raise UnknownImage(image_id)
            return self._images[image_id]

    @torch.no_grad()
    def predictions(self, emb_BE: torch.Tensor, key: str, n: int = 5) -> list[dict]:
        """Top-n classes with the model's own probabilities (CLIP: softmax at its logit scale; SigLIP: its sigmoid
        with the learnt bias; a model without a text tower: the softmax of its run's linear probe)."""
        probs = self.classifiers[key].probs(emb_BE)[0]
        vals, ids = probs.topk(min(n, len(self.class_names)))
        return [{"class": self.class_names[int(i)], "index": int(i), "prob": round(float(v), 5)}
                for i, v in zip(ids, vals)]

    def analyze(self, image_id: str, n: int = 10, per_patch: int = 3) -> dict:
        """Top latents of the image (image level: mean over CLS + patches) and of every patch, per model;
        with two models, the image-level lists split into common / base-only / adapted-only."""
        e = self.entry(image_id)
        out = {"image_id": image_id, "desc": e.desc,
               "label": self.class_names[e.label] if e.label is not None else None,
               "grid": list(self.models["base"].layout().grid), "models": {}}
        for key, model in self.models.items():
            f_TS, layout = self.codes(e, key), model.layout()
            ids, vals = patch_maps.top_latents_of_image(f_TS, n)
            p_vals, p_ids = f_TS[layout.n_cls:].topk(min(per_patch, self.d_sae), dim=1)
            emb = self.embedding(e, key)
            out["models"][key] = {
                "model": model.name, "top_latents": self._latent_rows(ids, vals, image_level=True),
                "top_relative": self._top_relative(f_TS, n),
                "patches": [self._latent_rows(i, v) for i, v in zip(p_ids.tolist(), p_vals.tolist())],
                "predictions": self.predictions(emb, key)}
        if "adapted" in self.models:
            lists = [[r["latent"] for r in out["models"][k]["top_latents"]] for k in ("base", "adapted")]
            out["groups"] = split_common(*lists)
        return out

    def patch(self, image_id: str, row: int, col: int, n: int = 10) -> dict:
        e = self.entry(image_id)
        out = {"image_id": image_id, "row": row, "col": col, "models": {}}
        for key, model in self.models.items():
            ids, vals = patch_maps.top_latents_of_patch(self.codes(e, key), model.layout(), row, col, n)
            out["models"][key] = {"top_latents": self._latent_rows(ids, vals)}
        return out

    def image_png(self, image_id: str, latent: int | None = None, kind: str = "image", key: str = "base",
                  size: int = DISPLAY) -> bytes:
        """The image at `size` pixels per side, or a latent's heatmap overlay / segmentation on it."""
        if kind not in KINDS:
            raise PatchSAEError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        e = self.entry(image_id)
        model = self.check_model(key)
        img = patch_maps.display_image(e.pixels_CHW, self.models["base"])
        img = np.asarray(Image.fromarray((img * 255).round().astype(np.uint8)).resize((size, size),
                                                                                      Image.BICUBIC)) / 255.0
        if kind == "image":
            return png_bytes(img)
        grid = patch_maps.patch_grid(self.codes(e, key), model.layout(), self.check_latent(latent))
        heat = patch_maps.upsample(grid, (size, size))
        return png_bytes(patch_maps.heatmap_overlay(img, heat) if kind == "heatmap"
                         else patch_maps.segmentation(img, heat))

    # ---- steering ------------------------------------------------------------------------------------------
    def steer(self, image_id: str, latent: int, scale: float, patches: Sequence[Sequence[int]] | None = None,
              key: str = "base") -> dict:
        """Multiply latent `latent` by `scale` at the hooked block and finish the forward pass.

        At each chosen token the residual stream h gets (scale - 1) * f_l(h) * d_l added, d_l = the decoder row
        in raw activation space: exactly the change of the SAE's reconstruction, with its error term kept, so
        scale 1 is the unmodified model and scale 0 removes the latent. `patches` = None steers every image
        token (CLS + patches, as the masking experiment splices); else only the listed (row, col) patches."""
        model = self.check_model(key)
        l = self.check_latent(latent)
        if not (0 <= scale <= 100):
            raise PatchSAEError(f"scale must be between 0 and 100, not {scale}")
        e = self.entry(image_id)
        layout = model.layout()
        if patches is None:
            tokens = torch.nonzero(layout.image_token_mask()).flatten()
        else:
            rows, cols = layout.grid
            bad = [p for p in patches if len(p) != 2 or not (0 <= p[0] < rows and 0 <= p[1] < cols)]
            if bad or not patches:
                raise PatchSAEError(f"patches must be a non-empty list of [row, col] inside the {rows}x{cols} grid")
            first = layout.n_cls + layout.n_prompt
            tokens = torch.tensor(sorted({first + r * cols + c for r, c in patches}))
        d_D = self.sae.raw_decoder_rows(l).detach()
        tokens = tokens.to(model.device)

        def fn(h_BTD: torch.Tensor) -> torch.Tensor:
            f_BT = self.sae.encode(h_BTD[:, tokens])[..., l]
            out = h_BTD.clone()
            out[:, tokens] += (scale - 1.0) * f_BT[..., None] * d_D
            return out

        with self.lock, torch.no_grad():
            before = self.embedding(e, key)
            with model.replace_block_output(self.layer, fn):
                after = model.image_features(e.pixels_CHW[None])
        return {"image_id": image_id, "latent": l, "scale": scale, "model": key,
                "tokens": len(tokens), "patches": None if patches is None else [list(p) for p in patches],
                "original": self.predictions(before, key), "steered": self.predictions(after, key)}
