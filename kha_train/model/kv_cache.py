"""The KV cache of incremental decoding (inference only; training never builds one).

``Transformer.forward(ids, cache=cache, attention_mask=mask)`` runs the new tokens ids [B, T]
at the absolute positions ``cache.length .. cache.length + T - 1`` and appends what each layer
needs to remember to ``cache``; a prefill is the first call (T = prompt length), a decoding step
a call with T = 1, and a chunked prefill several calls with T > 1. Each attention module decides
what it stores through its :class:`LayerCache` (``update(*new) -> all``), per variant:

    gqa, talking_heads   k, v after KHA, QK-norm and RoPE        [B, S, H_kv, d] each
    gta                  kv and the shared RoPE key k_r, raw      [B, S, H_kv, d], [B, S, 1, d/2]
    mla                  the latent c_kv and k_r, raw ("512+64")  [B, S, c], [B, S, r]
    mea                  the h_c cached heads, before HLC         [B, S, h_c, d] each

Variants that cache raw projections redo their per-token work (HLC, KHA, norms, RoPE,
up-projection) over all S cached positions each step: the same per-token arithmetic as the
full forward, so exact, at a cost linear in S like the attention itself.

Padding: prompts of different lengths are left-padded; ``attention_mask`` [B, T] (1 = real
token) marks the pads, which no query may attend to. Positions are shared by the batch (a pad
occupies a position), which changes nothing: RoPE scores depend only on q - k distances. A pad
query attends to itself only, so its (unused) row stays finite.

Tensors are appended with ``torch.cat`` (simple; a preallocated buffer would avoid the copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """What every layer has cached so far, the key padding mask and the current step's mask."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, ...]] = [() for _ in range(num_layers)]
        self.valid: torch.Tensor | None = None  # (B, S) bool: key s of sequence b is a real token
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) bool: query t may read key s

    @property
    def length(self) -> int:
        """Tokens cached so far (pads included): the position of the next token."""
        return 0 if self.valid is None else self.valid.shape[1]

    def begin(self, valid: torch.Tensor) -> None:
        """Start a forward of T new tokens; valid [B, T] bool marks the real (non-pad) ones."""
        start = self.length
        self.valid = valid if self.valid is None else torch.cat((self.valid, valid), dim=1)
        S = self.valid.shape[1]
        q_pos = torch.arange(start, S, device=valid.device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=valid.device)[None, :]  # (1, S)
        allowed = (k_pos <= q_pos) & self.valid[:, None, :]  # (B, T, S): causal, no pads
        self.mask = (allowed | (k_pos == q_pos))[:, None]  # (B, 1, T, S)

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


class LayerCache:
    """One layer's view of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache, self.index = cache, index

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, S) bool: new query t may attend to cached key s."""
        assert self.cache.mask is not None, "KVCache.begin was not called"
        return self.cache.mask

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new tokens' tensors [B, T, ...] along dim 1; return all S of each."""
        old = self.cache.layers[self.index]
        full = new if not old else tuple(torch.cat((o, n), dim=1) for o, n in zip(old, new))
        self.cache.layers[self.index] = full
        return full


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_qk) + mask) v of new queries q [B, T, H, d_qk] over all cached
    keys k [B, S, Hkv, d_qk] and values v [B, S, Hkv, d_v]; mask (B, 1, T, S) bool, True where
    allowed; query head i reads KV head i // (H / Hkv) -> [B, T, H, d_v]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T|S, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return o.transpose(1, 2)  # (B, T, H, d_v)
