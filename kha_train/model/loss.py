"""Next-token cross entropy over a large vocabulary without materialising the full logits.

For N tokens and V = 151,936 the fp32 logits of a micro-batch would take N * V * 4 bytes
(4.6 GB at N = 8192). :func:`chunked_cross_entropy` walks over chunks of tokens instead: each
chunk's logits are computed, reduced to its loss, and turned into that chunk's gradients right
away (d loss / d logits = softmax - onehot), so neither the forward nor the backward ever holds
more than one chunk of logits. Backward just scales the stored gradients by the incoming
gradient. Same FLOPs as the unchunked head (no recompute); extra memory: one gradient the size
of the hidden states and one the size of the head weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

IGNORE_INDEX = -100
# Tokens per chunk: 4096 x 151,936 bf16 logits (1.2 GB) plus their gradient are held at once.
# Larger chunks make the head GEMMs more efficient: 4096 was 0.75% faster than 2048 per
# training step of the reference model on an H100, 1024 was 2.5% slower (docs/performance.md).
DEFAULT_CHUNK_TOKENS = 4096


def lm_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
    compiled: bool = True,
    kernel: str = "chunked",
) -> torch.Tensor:
    """The training loss of the LM head, the one function the Transformer calls for it: mean
    cross entropy (fp32) of logits = hidden @ weight^T against labels, hidden [N, D], weight
    [V, D], labels [N]. ``kernel`` (parallel.loss_kernel): chunked, :func:`chunked_cross_entropy`
    (``chunk_tokens``, ``compiled``); liger or cce, another library's fused kernel
    (loss_kernels.py; ``scripts/bench_loss.py`` times them against ours)."""
    if kernel == "chunked":
        return chunked_cross_entropy(hidden, weight, labels, chunk_tokens, ignore_index, compiled)
    from kha_train.model.loss_kernels import fused_linear_cross_entropy

    hidden, weight = _head_inputs(hidden, weight)
    return fused_linear_cross_entropy(kernel, hidden, weight, labels, ignore_index)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
    compiled: bool = True,
) -> torch.Tensor:
    """Mean cross entropy (fp32) of logits = hidden @ weight^T against labels.

    hidden [N, D], weight [V, D] (the LM head), labels [N] with ``ignore_index`` for positions
    that carry no target. Returns a scalar; 0 if no position has a target. ``compiled``: on CUDA,
    run each chunk's loss and gradient through ``torch.compile`` (see ``_compiled_chunk_fn``).
    """
    hidden, weight = _head_inputs(hidden, weight)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCrossEntropy.apply(
        hidden, weight, labels, chunk_tokens, ignore_index, with_grad, compiled
    )


@torch.no_grad()
def chunked_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token cross entropy (fp32, no gradient) of logits = hidden @ weight^T: [N], 0 where
    ``labels`` is ``ignore_index``. For evaluation: one chunk of logits alive at a time, like
    :func:`chunked_cross_entropy`, where a full [N, V] logits tensor would not fit."""
    hidden, weight = _head_inputs(hidden, weight)
    valid = labels != ignore_index  # (N,)
    targets = torch.where(valid, labels, torch.zeros_like(labels))
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            logits = (hidden[start:end] @ weight.T).float()  # (n, V)
            y = targets[start:end, None]
            out[start:end] = torch.logsumexp(logits, dim=-1) - logits.gather(1, y).squeeze(1)
    return out * valid


def _head_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and the head weight in one dtype: autocast's (bf16) if it is on, so the head
    matmuls run there while the loss itself stays fp32; else hidden's."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight.to(hidden.dtype)


def _chunk_nll_and_grad(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of tokens: per-token NLL (fp32) and d loss / d logits (in h's dtype).

    h [n, D], weight [V, D], y [n] (valid ids), scale [n] = valid / n_valid. The gradient of
    sum(scale * nll) w.r.t. the logits is (softmax - onehot(y)) * scale.
    """
    logits = (h @ weight.T).float()  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    nll = lse - logits.gather(1, y[:, None]).squeeze(1)  # (n,)
    onehot = torch.arange(logits.shape[1], device=y.device)[None, :] == y[:, None]  # (n, V)
    grad = (torch.exp(logits - lse[:, None]) - onehot.float()) * scale[:, None]  # (n, V)
    return nll, grad.to(h.dtype)


@functools.cache
def _compiled_chunk_fn() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    # On CUDA, Inductor fuses the fp32 upcast, logsumexp, exp, one-hot and scaling into two
    # passes over the chunk's logits (eager makes ~8, each over fp32 data): this step was a
    # fifth of the A0.44B training step before (docs/performance.md).
    return torch.compile(_chunk_nll_and_grad, dynamic=False)


def _chunk_fn(
    device: torch.device, compiled: bool
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if compiled and device.type == "cuda":
        return _compiled_chunk_fn()
    return _chunk_nll_and_grad


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32, [V, D]) += g^T @ h, with the product accumulated in fp32."""
    if acc.device.type == "cuda" and g.dtype != torch.float32 and _fp32_out_addmm_works():
        # cuBLAS writes the fp32 sum directly: no bf16 [V, D] temporary and no upcast pass.
        torch.addmm(acc, g.T, h, out_dtype=torch.float32, out=acc)
    else:
        acc += (g.T @ h).float()


@functools.cache
def _fp32_out_addmm_works() -> bool:
    """Whether this torch build has addmm(..., out_dtype=float32) for bf16 inputs on CUDA."""
    try:
        a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        c = torch.zeros(16, 16, device="cuda")
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return bool(c[0, 0] == 16)  # one sync, once per process
    except (RuntimeError, TypeError):
        return False


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ignore_index, with_grad, compiled):  # type: ignore[override]
        N = hidden.shape[0]
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum().clamp_min(1).float()  # device scalar: no host sync
        targets = torch.where(valid, labels, torch.zeros_like(labels))  # (N,) in range for gather
        scale = valid.float() / n_valid  # (N,) weight of each token in the mean
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if with_grad
            else None
        )
        chunk_fn = _chunk_fn(hidden.device, compiled)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, N, chunk_tokens):
                end = min(start + chunk_tokens, N)
                h, y, ok = hidden[start:end], targets[start:end], valid[start:end]
                if not with_grad:
                    logits = (h @ weight.T).float()  # (n, V): the only chunk of logits alive
                    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, y[:, None]).squeeze(1)
                    loss_sum += (nll * ok).sum()
                    continue
                nll, g = chunk_fn(h, weight, y, scale[start:end])  # (n,), (n, V)
                loss_sum += (nll * ok).sum()
                grad_hidden[start:end] = g @ weight  # (n, D)
                _accumulate_grad_weight(grad_weight, g, h)  # (V, D)
        if with_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )
