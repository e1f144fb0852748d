"""StepHistory.gather_sample_ids across 2 real gloo ranks (spawned processes)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kha_train.training.history import StepHistory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        h = StepHistory(capacity=4, device=torch.device("cpu"))
        one, ok = torch.tensor(1.0), torch.tensor(True)
        for step in (7, 8, 9):  # this rank's 4 sample ids of each step: rank * 100 + step * 10 + i
            h.record(step, one, one, ok, torch.arange(4) + rank * 100 + step * 10)
        h.drain()
        out[rank] = h.gather_sample_ids(2, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_sample_ids_of_each_step_come_from_every_rank_in_rank_order() -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        got = dict(out)
    want = {
        s: [s * 10 + i for i in range(4)] + [100 + s * 10 + i for i in range(4)] for s in (7, 8, 9)
    }
    assert got[0] == got[1] == want
