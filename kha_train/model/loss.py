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

import torch

IGNORE_INDEX = -100


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 2048,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross entropy (fp32) of logits = hidden @ weight^T against labels.

    hidden [N, D], weight [V, D] (the LM head), labels [N] with ``ignore_index`` for positions
    that carry no target. Returns a scalar; 0 if no position has a target.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        # Run the head matmuls in the autocast dtype (bf16); the loss itself stays fp32.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens, ignore_index, with_grad)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, ignore_index, with_grad):  # type: ignore[override]
        N = hidden.shape[0]
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum().clamp_min(1).float()  # device scalar: no host sync
        targets = torch.where(valid, labels, torch.zeros_like(labels))  # (N,) in range for gather
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if with_grad
            else None
        )
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, N, chunk_tokens):
                end = min(start + chunk_tokens, N)
                h, y, ok = hidden[start:end], targets[start:end, None], valid[start:end]
                logits = (h @ weight.T).float()  # (n, V): the only chunk of logits alive
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                nll = lse - logits.gather(1, y).squeeze(1)  # (n,)
                loss_sum += (nll * ok).sum()
                if not with_grad:
                    continue
                # d(sum nll / n_valid) / d logits = (softmax - onehot(y)) * ok / n_valid
                probs = logits.sub_(lse[:, None]).exp_()  # (n, V), in place of the logits
                probs.scatter_add_(1, y, torch.full_like(y, -1, dtype=probs.dtype))
                probs.mul_((ok.float() / n_valid)[:, None])
                g = probs.to(hidden.dtype)  # (n, V)
                grad_hidden[start:end] = g @ weight  # (n, D)
                grad_weight += (g.T @ h).float()  # (V, D)
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
        )
