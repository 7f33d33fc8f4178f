"""Sparse SAE codes of a batch of images and splicing a (masked) decoding into the model.

The code of each token is kept as its nonzero values and their latent ids, so a masked decoding costs one
`embedding_bag` over the decoder rows instead of a dense (tokens x d_sae) product.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from patchsae.analysis.latents import ENCODE_ELEMENTS, image_rows
from patchsae.models.clip import ClipModel
from patchsae.sae.model import SAE


class SparseCodes:
    """The SAE code of a batch kept as its nonzero entries: value_BTK and latent id_BTK, K = the most latents
    active at any token (padding entries have value 0). Encoding runs in chunks of images, so no
    (images x tokens x d_sae) tensor larger than ENCODE_ELEMENTS exists.

    A masked decoding is an `embedding_bag` over the decoder rows, B*T*K*D work instead of B*T*d_sae*D, and
    the gathered rows are never materialised."""

    def __init__(self, sae: SAE, h_BTD: torch.Tensor):
        self.sae = sae
        B, T, _ = h_BTD.shape
        chunk = max(1, ENCODE_ELEMENTS // max(T * sae.cfg.d_sae, 1))
        values, ids = [], []
        for s in range(0, B, chunk):
            f_BTS = sae.encode(h_BTD[s: s + chunk])
            K = max(int((f_BTS > 0).sum(-1).max()), 1)
            v, i = f_BTS.topk(K, dim=-1, sorted=False)
            values.append(v)
            ids.append(i)
        K = max(v.shape[-1] for v in values)
        self.value_BTK = torch.cat([F.pad(v, (0, K - v.shape[-1])) for v in values])
        self.id_BTK = torch.cat([F.pad(i, (0, K - i.shape[-1])) for i in ids])

    def positions(self, pos_BS: torch.Tensor) -> torch.Tensor:
        """Ranking position of each stored entry (B, T, K), from per-image positions (B, d_sae)."""
        B, T, K = self.id_BTK.shape
        return pos_BS.gather(1, self.id_BTK.reshape(B, T * K)).view(B, T, K)

    def decode(self, keep_BTK: torch.Tensor | None = None) -> torch.Tensor:
        """SAE decoding of the kept entries in raw activation space (B, T, d_model); None keeps all."""
        v_BTK = self.value_BTK if keep_BTK is None else self.value_BTK * keep_BTK
        B, T, K = v_BTK.shape
        return self.sae.decode_sparse(v_BTK.reshape(B * T, K), self.id_BTK.reshape(B * T, K)).view(B, T, -1)


@contextmanager
def spliced(model: ClipModel, sae: SAE, layer: int, keep_S: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, every forward of `model` replaces the hooked block's output at the image tokens by the
    SAE decoding of the latents in `keep_S` (all if None), through the model's generic splice hook; for single
    forwards and checks (the grid itself computes the block output once and finishes it many times)."""
    rows_T, _ = image_rows(model)
    sae = sae.to(model.device)

    def fn(h_BTD: torch.Tensor) -> torch.Tensor:
        f_BTS = sae.encode(h_BTD[:, rows_T])
        out_BTD = h_BTD.clone()
        out_BTD[:, rows_T] = sae.decode(f_BTS if keep_S is None else f_BTS * keep_S.to(f_BTS.device))
        return out_BTD

    with model.replace_block_output(layer, fn):
        yield

