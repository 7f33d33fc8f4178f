"""The latents of one `analyze` output as the explorer and the report list them: names (honest ones beside the
raw top name), kinds, the most-interpretable order with its kind filter, one latent's statistics, search, a
class's top latents (by specificity or by raw count) and the rows of top-latent lists."""

from __future__ import annotations

from typing import Sequence

import torch

from patchsae import PatchSAEError
from patchsae.analysis import kinds
from patchsae.analysis.latents import LOW_ENTROPY
from patchsae.models.backbone import TokenLayout


def saved_kinds(tensors: dict[str, torch.Tensor]) -> kinds.LatentKinds:
    """The latent kinds `analyze` saved beside its statistics."""
    return kinds.LatentKinds(**{f: tensors[f] for f in kinds.LatentKinds.__dataclass_fields__})


class Catalog:
    """What `analyze` wrote (manifest, per-latent tensors), read for listing; `layout` places token positions."""

    def __init__(self, manifest: dict, stats: dict[str, torch.Tensor], layout: TokenLayout):
        self.manifest, self.stats, self.layout = manifest, stats, layout
        self.class_names = list(manifest["class_names"])
        vocab = self.manifest["naming"]["vocabulary"]
        self.names = [[(vocab[int(i)], float(s)) for i, s in zip(idx, sc) if i >= 0]
                      for idx, sc in zip(self.stats["name_index_SN"].tolist(), self.stats["name_score_SN"].tolist())]
        self.kinds = saved_kinds(self.stats)
        self.kind_names = self.kinds.names()
        self.p_CS = kinds.class_shares(self.stats["class_counts_CS"], self.stats["class_images_C"])
        self._orders: dict[tuple[str, ...], list[int]] = {}
        self.order = self.ordered()  # the default listing: dense and positional latents left out
        self._rank = {l: r for r, l in enumerate(self.ordered(kinds.KINDS[:-1]))}

    @property
    def d_sae(self) -> int:
        return len(self.stats["frequency_S"])

    def check_latent(self, latent: int) -> int:
        if not 0 <= latent < self.d_sae:
            raise PatchSAEError(f"latent {latent} does not exist (the SAE has {self.d_sae}: 0..{self.d_sae - 1})")
        return latent

    def name(self, latent: int) -> str:
        return self.names[latent][0][0] if self.names[latent] else ""

    def label(self, latent: int) -> str:
        """The top name with its score, marked as a guess unless the latent is class-selective."""
        name, score = self.names[latent][0] if self.names[latent] else ("", 0.0)
        return kinds.honest_name(name, score, self.kind_names[latent])

    def ordered(self, shown: Sequence[str] = kinds.SHOWN_BY_DEFAULT) -> list[int]:
        """The latents of the `shown` kinds, most interpretable first (`kinds.interpretable_order`)."""
        key = kinds.check_shown(shown)
        if key not in self._orders:
            self._orders[key] = kinds.interpretable_order(self.kinds, self.stats["entropy_S"],
                                                          self.stats["frequency_S"], key)
        return self._orders[key]

    def _latent_rows(self, ids: Sequence[int], vals: Sequence[float], image_level: bool = False) -> list[dict]:
        """Rows of a top-latent list; image-level ones also carry the activation relative to the latent's
        typical one (its mean image-level activation where it fires)."""
        ids = [int(i) for i, v in zip(ids, vals) if v > 0]
        vals = [float(v) for v in vals if v > 0]
        rel = kinds.relative_activation(torch.tensor(vals), torch.tensor(ids, dtype=torch.long),
                                        self.stats["mean_act_S"]).tolist() if image_level and ids else []
        rows = [{"latent": i, "activation": round(v, 5), "name": self.name(i), "label": self.label(i),
                 "kind": self.kind_names[i]} for i, v in zip(ids, vals)]
        for r, x in zip(rows, rel):
            r["relative"] = round(x, 3)
        return rows

    def _top_relative(self, f_TS: torch.Tensor, n: int) -> list[dict]:
        """The image's latents with the largest activation relative to their typical one."""
        img_S = f_TS.mean(0)
        rel_S = kinds.relative_activation(img_S, torch.arange(len(img_S)), self.stats["mean_act_S"])
        vals, ids = rel_S.topk(min(n, len(rel_S)))
        keep = [int(i) for i, v in zip(ids, vals) if v > 0]
        return self._latent_rows(keep, img_S[keep].tolist(), image_level=True)

    # ---- latents --------------------------------------------------------------------------------------------
    def summary(self, latent: int) -> dict:
        s = self.stats
        k = self.kinds
        return {"latent": latent, "name": self.name(latent), "label": self.label(latent),
                "kind": self.kind_names[latent], "class_share": round(float(k.class_share_S[latent]), 4),
                "position_share": round(float(k.position_share_S[latent]), 4),
                "frequency": round(float(s["frequency_S"][latent]), 6),
                "mean_activation": round(float(s["mean_act_S"][latent]), 5),
                "entropy": round(float(s["entropy_S"][latent]), 4)}

    def latent(self, latent: int) -> dict:
        """Statistics of one latent from `analyze`: names, frequency, mean activation, label entropy, majority
        label, class-level counts and reference images (by image-level and by single-patch activation)."""
        l, s = self.check_latent(latent), self.stats
        maj = int(s["majority_S"][l])

        def refs(prefix: str) -> list[dict]:
            return [{"index": int(i), "value": round(float(v), 5), "class": self.class_names[int(y)]}
                    for i, v, y in zip(s[f"{prefix}_index_SK"][l], s[f"{prefix}_value_SK"][l],
                                       s[f"{prefix}_label_SK"][l]) if i >= 0]

        return {**self.summary(l), "names": [{"name": n, "score": round(sc, 4)} for n, sc in self.names[l]],
                "fired_images": int(s["fired_S"][l]), "analysed_images": self.manifest["n_images"],
                "majority": self.class_names[maj] if maj >= 0 else None,
                "low_entropy": bool(s["entropy_S"][l] < LOW_ENTROPY) and int(s["fired_S"][l]) > 0,
                "rank": self._rank.get(l), "quality": self._quality(l),
                "class_counts": [{"class": c, "count": int(n)} for c, n in zip(self.class_names,
                                                                               s["class_counts_CS"][:, l])],
                "dataset_count": int(s["dataset_counts_S"][l]),
                "references": refs("top"), "patch_references": refs("patch")}

    def _quality(self, l: int) -> dict:
        """What the latent's kind was read from: class selectivity, spatial concentration, density."""
        k = self.kinds
        top_c, pos = int(k.top_class_S[l]), int(k.top_position_S[l])
        return {"class_share": round(float(k.class_share_S[l]), 4), "top_class": self.class_names[top_c] if top_c >= 0
                else None, "class_entropy": round(float(k.class_entropy_S[l]), 4),
                "position_share": round(float(k.position_share_S[l]), 4),
                "position": kinds.position_label(pos, self.layout.grid, self.layout.n_cls) or None,
                "token_frequency": round(float(self.stats["token_fired_S"][l]) / max(
                    self.manifest["n_images"] * self.stats["position_mass_ST"].shape[1], 1), 6)}

    def search(self, query: str = "", limit: int = 50, shown: Sequence[str] = kinds.SHOWN_BY_DEFAULT) -> dict:
        """Latents of the `shown` kinds whose names contain the query (case-insensitive), or whose id equals it
        (whatever its kind); with no query, the most interpretable ones. Results in interpretability order."""
        q = query.strip().lower()
        order = self.ordered(shown)
        listed = set(order)
        if not q:
            hits = order
        else:
            by_name = [l for l in range(self.d_sae) if l in listed and any(q in n.lower() for n, _ in self.names[l])]
            by_id = [int(q)] if q.isdigit() and int(q) < self.d_sae else []
            first = lambda l: q not in self.name(l).lower()  # noqa: E731 - matches of the top name first
            hits = by_id + sorted((l for l in by_name if l not in by_id),
                                  key=lambda l: (first(l), self._rank.get(l, self.d_sae + l)))
        shown = kinds.check_shown(shown)
        hidden = {k: n for k, n in self.kinds.counts().items() if k not in shown and k != "dead"}
        return {"query": query, "total": len(hits), "shown": list(shown), "hidden": hidden,
                "latents": [self.summary(l) for l in hits[:limit]]}

    def class_latents(self, c: int, n: int = 10, order: str = "specificity") -> dict:
        """A class's top latents: by specificity (the class's share of the latent's class-level count, over
        latents with at least `min_count` tokens in all; the default) or by the paper's raw class-level count
        (which puts the same dense latents first in every class)."""
        if not 0 <= c < len(self.class_names):
            raise PatchSAEError(f"class {c} does not exist (0..{len(self.class_names) - 1})")
        counts_S = self.stats["class_counts_CS"][c]
        if order == "specificity":
            min_count = ((self.manifest.get("kinds") or {}).get("thresholds") or {}).get("min_count", 0)
            ids = kinds.class_specific_order(self.p_CS, self.stats["class_counts_CS"], c, min_count)[:n]
        elif order == "count":
            ids = [int(i) for i, v in zip(*reversed(counts_S.topk(min(n, self.d_sae)))) if v > 0]
        else:
            raise PatchSAEError(f"order must be specificity or count, not {order!r}")
        return {"class": self.class_names[c], "index": c, "order": order,
                "latents": [{**self.summary(i), "count": int(counts_S[i]), "share": round(float(self.p_CS[c, i]), 4)}
                            for i in ids]}

