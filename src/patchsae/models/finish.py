"""The fast CLS-only finish: only the CLS output of the last block feeds CLIP's image embedding, so the last block
need only be run for the CLS query (keys and values still from every token). `Backbone.finisher` checks it
against the model's own `finish_from` before anyone uses it."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def is_plain_clip_layer(block: nn.Module) -> bool:
    """Whether `block` is exactly HF's CLIP encoder layer with its eager attention module (the computation
    `cls_only_last_block` reproduces); subclasses may compute something else, so they do not count."""
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

    return type(block) is CLIPEncoderLayer and type(block.self_attn) is CLIPAttention


def cls_only_last_block(block: nn.Module, h_BTD: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder layer evaluated for the CLS query only (keys/values from all tokens): (B, 1, D)."""
    attn = block.self_attn
    x_BTD = block.layer_norm1(h_BTD)
    B, T, D = x_BTD.shape
    H, hd = attn.num_heads, attn.head_dim
    q_BH1d = attn.q_proj(x_BTD[:, :1]).view(B, 1, H, hd).transpose(1, 2)
    k_BHTd = attn.k_proj(x_BTD).view(B, T, H, hd).transpose(1, 2)
    v_BHTd = attn.v_proj(x_BTD).view(B, T, H, hd).transpose(1, 2)
    w_BH1T = torch.softmax((q_BH1d @ k_BHTd.transpose(-1, -2)) * attn.scale, dim=-1)
    o_B1D = (w_BH1T @ v_BHTd).transpose(1, 2).reshape(B, 1, D)
    r_B1D = h_BTD[:, :1] + attn.out_proj(o_B1D)
    return r_B1D + block.mlp(block.layer_norm2(r_B1D))


def cls_only_finisher(blocks: Sequence[nn.Module], head: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """h_BTD -> head(CLS after `blocks`), the last block run for CLS only; None unless every block is a plain
    CLIP layer. `head` maps the final CLS row (B, D) to image features (B, E)."""
    blocks = list(blocks)
    if not blocks or not all(is_plain_clip_layer(b) for b in blocks):
        return None

    @torch.no_grad()
    def finish(h_BTD: torch.Tensor) -> torch.Tensor:
        h_BTD = h_BTD.to(device)
        for block in blocks[:-1]:
            h_BTD = block(h_BTD, None)
        return head(cls_only_last_block(blocks[-1], h_BTD)[:, 0])

    return finish
