"""MEA "virtual heads" (Peng et al. 2026, appendix F): fewer cached KV heads, expanded by HLC.

A trained GQA or MEA model's K (and V) projection of one layer, read per KV head, is a stack of
h matrices W_i [d, D] (for MEA, W_i = sum_j W_lc[j, i] W_c[j]: HLC folded in). Flattened to
M [h, d * D] and factored by SVD, M = U S V^T, its best rank-r approximation (Frobenius norm)
is U_r S_r V_r^T. So r cached heads W_c[j] = S_j V_j^T (reshaped to [d, D]) and the HLC
matrix W_lc = U_r^T [r, h] give back every head: W_i ~= sum_j W_lc[j, i] W_c[j], exactly when
r = rank(M) (so r = h loses nothing). HLC sits right after the projections, before KHA and the
QK-norm (attn_mea.py), which is what makes this factorisation the whole story: everything after
it sees the reconstructed heads. The KV cache shrinks from 2 h d to 2 r d values per token.

The converted model is an MEA model (model.attention=mea, model.mea.cached_kv_heads=r); a GQA
source gets head_norm off (it had none), an MEA source keeps its setting. All other weights,
KHA included, are copied unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from kha_train.config import AttentionKind, MEAConfig
from kha_train.model.attention import Attention
from kha_train.model.attn_mea import ExplicitAttention
from kha_train.model.loss import IGNORE_INDEX
from kha_train.model.transformer import Transformer


class VirtualHeadsError(ValueError):
    """A model or head count the conversion cannot take; the message says what to change."""


def head_weights(attn: Attention, target: str) -> torch.Tensor:
    """Layer's K or V (``target``) projection per KV head, HLC folded in: [h, d, D], float64."""
    w = getattr(attn, f"{target}_proj").weight.detach().double()
    w = w.view(-1, attn.head_dim, w.shape[1])  # (cached or KV heads, d, D)
    if isinstance(attn, ExplicitAttention):
        hlc = getattr(attn, f"hlc_{target}").detach().double()  # (h_c, h)
        w = torch.einsum("ji,jdD->idD", hlc, w)  # (h, d, D)
    return w


def head_spectrum(attn: Attention, target: str) -> torch.Tensor:
    """Singular values of the layer's [h, d * D] K or V projection (HLC folded in)."""
    w = head_weights(attn, target)
    return torch.linalg.svdvals(w.reshape(w.shape[0], -1))


def kept_share(attn: Attention, target: str, r: int) -> float:
    """Share of the layer's K or V projection (squared Frobenius norm, HLC folded in) that ``r``
    cached heads keep: 1.0 when the rank-r factorisation is exact, about r / h when the h
    heads are independent (then dropping heads loses that much of K or V, whatever the method)."""
    s2 = head_spectrum(attn, target) ** 2
    return float(s2[:r].sum() / s2.sum())


def _factor(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached head rows [r * d, D], HLC [r, h]) of the best rank-r factorisation of w [h, d, D]."""
    h, d, D = w.shape
    U, S, Vh = torch.linalg.svd(w.reshape(h, d * D), full_matrices=False)
    cached = (S[:r, None] * Vh[:r]).reshape(r * d, D)  # W_c[j] = S_j V_j^T
    return cached, U[:, :r].T.contiguous()  # W_lc[j, i] = U[i, j]: orthonormal rows


@torch.no_grad()
def convert_to_virtual_heads(model: Transformer, n_cached: int) -> Transformer:
    """A new MEA model that caches ``n_cached`` KV heads per layer, from a GQA or MEA ``model``
    (left unchanged), by the SVD factorisation of the module docstring. Same device and dtype."""
    cfg = model.cfg
    kind = AttentionKind(cfg.attention)
    if kind not in (AttentionKind.gqa, AttentionKind.mea):
        raise VirtualHeadsError(
            f"virtual heads convert GQA / MQA / MHA or MEA models, not model.attention="
            f"{kind.value} (GTA's keys and values share a projection; MLA already caches a "
            "latent): train with model.attention=gqa or mea"
        )
    if not 1 <= n_cached <= cfg.num_kv_heads:
        raise VirtualHeadsError(
            f"the number of cached KV heads must be in [1, model.num_kv_heads="
            f"{cfg.num_kv_heads}], got {n_cached}"
        )
    head_norm = cfg.mea.head_norm if kind == AttentionKind.mea else False
    new_cfg = dataclasses.replace(
        cfg,
        attention=AttentionKind.mea,
        mea=MEAConfig(cached_kv_heads=n_cached, head_norm=head_norm),
    )
    param = next(model.parameters())
    with torch.device("meta"):
        new = Transformer(new_cfg)
    new.to_empty(device=param.device)
    with torch.random.fork_rng(devices=[]):  # fills the non-persistent buffers; RNG untouched
        new.init_weights()
    new.to(param.dtype)
    state = {k: v for k, v in model.state_dict().items() if not _is_kv_weight(k)}
    for i, block in enumerate(model.layers):
        for target in ("k", "v"):
            cached, hlc = _factor(head_weights(block.attn, target), n_cached)
            state[f"layers.{i}.attn.{target}_proj.weight"] = cached.to(param.dtype)
            state[f"layers.{i}.attn.hlc_{target}"] = hlc.to(param.dtype)
    new.load_state_dict(state, strict=True)
    return new


def _is_kv_weight(key: str) -> bool:
    """The keys the conversion replaces: K/V projections and HLC matrices of every layer."""
    return key.endswith(("attn.k_proj.weight", "attn.v_proj.weight", "attn.hlc_k", "attn.hlc_v"))


# -- the command -----------------------------------------------------------------------------


def run_virtual_heads(args: argparse.Namespace) -> int:
    from kha_train.config import (
        AttnBackend,
        ConfigError,
        save_config,
    )
    from kha_train.model.flops import kv_cache_elems_per_token_per_layer
    from kha_train.tools.weights_io import load_model, load_source_config, save_weights

    source = Path(args.source)
    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix != ".safetensors" or out.exists()):
        raise ConfigError(
            f"--out {out}: must be a new .safetensors path (it exists, or has another suffix)"
        )
    cfg = load_source_config(source, args.config, args.overrides)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type != "cuda" and cfg.model.attn_backend not in (AttnBackend.auto, "math"):
        print(f"note: model.attn_backend={cfg.model.attn_backend.value} needs CUDA; using auto")
        cfg.model.attn_backend = AttnBackend.auto
    model = load_model(cfg.model, source, device)
    batches = _heldout_batches(cfg, args.batches, device)
    before = _heldout_loss(model, batches)
    new = convert_to_virtual_heads(model, args.kv_heads)
    after = _heldout_loss(new, batches)
    cache, new_cache = (kv_cache_elems_per_token_per_layer(c) for c in (cfg.model, new.cfg))
    tokens = sum(b.labels.numel() for b in batches)
    kept = {t: [kept_share(blk.attn, t, args.kv_heads) for blk in model.layers] for t in "kv"}
    print(
        f"virtual heads: {cfg.model.num_kv_heads} -> {args.kv_heads} cached KV heads per layer "
        f"(KV cache {cache} -> {new_cache} values per token per layer)\n"
        f"share of K / V kept by the factorisation, per layer: "
        f"{' '.join(f'{k:.2f}/{v:.2f}' for k, v in zip(kept['k'], kept['v'], strict=True))}\n"
        f"held-out loss ({len(batches)} batches, {tokens:,} tokens of {cfg.data.dataset} val): "
        f"before {before:.4f}, after {after:.4f} ({after - before:+.4f})"
    )
    if out is not None:
        save_weights(new, out)
        save_config(dataclasses.replace(cfg, model=new.cfg), out.with_suffix(".yaml"))
        print(f"wrote {out} and {out.with_suffix('.yaml')}")
    return 0


def _heldout_batches(cfg, n: int, device):
    """The first ``n`` micro-batches of the run's val split, as the trainer's validation reads
    them on one rank (the loader the trainer builds from the same config)."""
    from kha_train.data.loader import PackedLoader

    with PackedLoader.from_config(cfg, "val", device=device) as loader:
        return list(loader.eval_batches(n))


def _heldout_loss(model, batches) -> float:
    """Mean next-token loss over every labelled position of ``batches`` (bf16 on CUDA)."""
    model.eval()
    total, count = 0.0, 0
    cuda = next(model.parameters()).is_cuda
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        for b in batches:
            n = int((b.labels != IGNORE_INDEX).sum())
            model.last_aux_loss = None
            loss = model(b.input_ids, b.labels)
            if model.last_aux_loss is not None:  # balancing=aux_loss: report the LM loss only
                loss = loss - model.last_aux_loss
            total += loss.item() * n
            count += n
    return total / max(count, 1)
