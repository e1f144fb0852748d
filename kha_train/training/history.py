"""Per-step training values kept on the device until the host reads them.

Every optimizer step records its global loss, gradient norm and "finite" flag into a small device
buffer, and updates the count of consecutive non-finite steps, all without a host sync. The
trainer reads the buffer in one transfer at logging steps, checkpoints and validation (a
"drain"), and only then feeds the spike detector and its logs. Sample ids of each step stay here
too, and are gathered from every rank only when a spike or a skipped step needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class StepValues:
    step: int
    loss: float
    grad_norm: float
    ok: bool  # loss and gradient norm were finite (the update was applied)
    grad_parts: list[float] | None = None  # the grad norm of each model part (grad_parts.py)


@dataclass
class Drained:
    steps: list[StepValues]
    in_row: int  # consecutive non-finite steps at the end of the drained steps
    max_in_row: int  # the longest such run seen since the previous drain


class StepHistory:
    def __init__(self, capacity: int, device: torch.device, in_row: int = 0) -> None:
        self._values = torch.zeros(capacity, 3, device=device)  # loss, grad norm, ok
        self._parts: torch.Tensor | None = None  # (capacity, parts), from the first step with them
        self._len = 0
        self._first_step = 0
        self._sample_ids: list[torch.Tensor] = []
        self._in_row = torch.tensor(in_row, device=device)
        self._max_in_row = torch.tensor(in_row, device=device)

    def __len__(self) -> int:
        return self._len

    @property
    def full(self) -> bool:
        return self._len == len(self._values)

    def record(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        ok: torch.Tensor,
        sample_ids: torch.Tensor,
        grad_parts: torch.Tensor | None = None,
    ) -> None:
        """Store optimizer step ``step`` (1-based). Device writes only."""
        if self.full:
            raise RuntimeError("StepHistory is full: drain it first")
        if self._len == 0:
            self._first_step = step
        self._values[self._len] = torch.stack([loss.float(), grad_norm.float(), ok.float()])
        if grad_parts is not None:
            if self._parts is None:
                self._parts = torch.zeros(
                    len(self._values), len(grad_parts), device=self._values.device
                )
            self._parts[self._len] = grad_parts
        self._len += 1
        self._sample_ids.append(sample_ids)
        self._in_row = (self._in_row + 1) * (~ok)
        self._max_in_row = torch.maximum(self._max_in_row, self._in_row)

    def drain(self) -> Drained:
        """Read every recorded step (one host sync) and start over. Sample ids stay readable
        through :meth:`gather_sample_ids` until the next :meth:`record`."""
        rows = self._values[: self._len].tolist()
        parts = self._parts[: self._len].tolist() if self._parts is not None else [None] * len(rows)
        in_row, max_in_row = int(self._in_row.item()), int(self._max_in_row.item())
        steps = [
            StepValues(self._first_step + j, loss, gnorm, bool(ok), part)
            for j, ((loss, gnorm, ok), part) in enumerate(zip(rows, parts, strict=True))
        ]
        self._drained_ids, self._drained_first = self._sample_ids, self._first_step
        self._len, self._sample_ids = 0, []
        self._max_in_row.copy_(self._in_row)
        return Drained(steps, in_row, max_in_row)

    def gather_sample_ids(self, world_size: int, device: torch.device) -> dict[int, list[int]]:
        """step -> global sample ids of the steps of the last drain, from every rank's
        micro-batches in rank order. A collective: every rank must call it."""
        if not self._drained_ids:
            return {}
        local = torch.stack(self._drained_ids)  # (k, samples per rank per step)
        if world_size > 1:
            local = local.to(device)
            k = local.shape[0]
            # Ranks' blocks concatenated along dim 0 (gloo accepts only that output layout).
            out = torch.empty((world_size * k, *local.shape[1:]), dtype=local.dtype, device=device)
            dist.all_gather_into_tensor(out, local)
            out = out.view(world_size, k, -1)  # (world, k, per rank)
            local = out.transpose(0, 1).reshape(k, -1)  # (k, world * per rank)
        return {self._drained_first + j: ids for j, ids in enumerate(local.tolist())}
