"""PackedLoader: packing, document boundaries, order, exact resume, rank-count change, val."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import read_split, write_jsonl

from kha_train.data.loader import Batch, PackedLoader
from kha_train.data.errors import DataError
from kha_train.data.order import epoch_permutation
from kha_train.data.shards import read_index

T, MB = 16, 2


def make(dataset: Path, **kw) -> PackedLoader:
    kw.setdefault("seq_len", T)
    kw.setdefault("micro_batch_size", MB)
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("seed", 7)
    return PackedLoader(dataset, **kw)


def steps(loader: PackedLoader, n: int) -> list[list[Batch]]:
    return [loader.next_step() for _ in range(n)]


def step_ids(step: list[Batch]) -> list[int]:
    return torch.cat([b.sample_ids for b in step]).tolist()


def test_batches_are_windows_of_the_token_stream(dataset: Path, tok) -> None:
    index = read_index(dataset)
    stream = read_split(index, "train")
    loader = make(dataset, prefetch=0)
    assert loader.num_samples == (len(stream) - 1) // T
    for step in steps(loader, 3):
        for b in step:
            assert b.input_ids.shape == b.labels.shape == b.doc_ids.shape == (MB, T)
            assert b.input_ids.dtype == torch.long and b.sample_ids.shape == (MB,)
            for row, i in enumerate(b.sample_ids.tolist()):
                window = stream[i * T : i * T + T + 1]  # crosses shard boundaries too
                assert b.input_ids[row].tolist() == window[:-1].tolist()
                assert b.labels[row].tolist() == window[1:].tolist()


def test_document_boundaries(dataset: Path, tok) -> None:
    loader = make(dataset, seq_len=64, prefetch=0)
    seen_boundary = False
    for b in loader.next_step():
        for x, doc, pos in zip(b.input_ids.tolist(), b.doc_ids.tolist(), b.positions.tolist()):
            d, p = 0, 0  # reference: a new document starts after every EOS
            for t, token in enumerate(x):
                assert (doc[t], pos[t]) == (d, p)
                if token == tok.eos_id:
                    d, p, seen_boundary = d + 1, 0, True
                else:
                    p += 1
    assert seen_boundary


def test_epochs_cover_every_sample_once_in_a_fresh_order(dataset: Path) -> None:
    loader = make(dataset, prefetch=1)
    n = loader.num_samples
    ids = []
    while len(ids) < 2 * n + 8:
        ids += step_ids(loader.next_step())
    first, second = ids[:n], ids[n : 2 * n]
    assert sorted(first) == list(range(n)) == sorted(second)  # nothing repeated or skipped
    assert first != second  # a new permutation each epoch
    assert first == epoch_permutation(n, 7, 0).tolist()
    assert loader.epoch == loader.sample_index // n >= 2
    other_seed = step_ids(make(dataset, seed=8).next_step())
    assert other_seed != first[:8]


def test_state_dict_is_plain_and_reflects_yielded_batches(dataset: Path) -> None:
    loader = make(dataset, prefetch=4)
    steps(loader, 3)
    state = loader.state_dict()  # the thread has read ahead, the state must not
    assert state["sample_index"] == 24 and state["epoch"] == 0
    assert all(isinstance(v, int | str) for v in state.values())
    next(loader)
    with pytest.raises(RuntimeError, match="middle of an optimizer step"):
        loader.state_dict()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_exact_resume(dataset: Path, prefetch: int) -> None:
    reference = make(dataset, prefetch=prefetch)
    total = reference.num_samples // 8 + 5
    expected = steps(reference, total)  # crosses an epoch boundary
    assert reference.epoch == 1
    first = make(dataset, prefetch=prefetch)
    got = steps(first, total - 27)
    state = first.state_dict()
    first.close()
    resumed = make(dataset, prefetch=prefetch, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    got += steps(resumed, 27)
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            for field in ("input_ids", "labels", "doc_ids", "positions", "sample_ids"):
                assert torch.equal(getattr(x, field), getattr(y, field))


def run_ranks(
    dataset: Path, world: int, n_steps: int, state=None, gbs: int = 8
) -> tuple[list, dict]:
    """Run ``world`` rank loaders in lockstep; return each step's samples (rank order) + state."""
    loaders = [make(dataset, rank=r, world_size=world, global_batch_size=gbs) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = []
    for _ in range(n_steps):
        out.append([i for ld in loaders for i in step_ids(ld.next_step())])
    states = [ld.state_dict() for ld in loaders]
    assert all(s == {**states[0], "world_size": world} for s in states)
    return out, states[0]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (4, 2)])
def test_rank_count_change_continues_the_same_sequence(
    dataset: Path, before: int, after: int
) -> None:
    total = make(dataset).num_samples // 8 + 3  # into the second epoch
    single, _ = run_ranks(dataset, 1, total)
    assert all(len(set(s)) == 8 for s in single)
    head, state = run_ranks(dataset, before, 11)
    tail, _ = run_ranks(dataset, after, total - 11, state)
    assert head + tail == single  # the same samples in the same global order, per step
    n = make(dataset).num_samples
    epoch0 = [i for s in head + tail for i in s][:n]
    assert sorted(epoch0) == list(range(n))  # within an epoch, nothing repeated or skipped


def test_ranks_get_disjoint_slices(dataset: Path) -> None:
    r0 = make(dataset, rank=0, world_size=2)
    r1 = make(dataset, rank=1, world_size=2)
    assert r0.micro_batches_per_step == 2
    for a, b in zip(steps(r0, 5), steps(r1, 5)):
        assert not set(step_ids(a)) & set(step_ids(b))


def test_global_batch_change_on_resume_continues_from_the_sample_index(dataset: Path) -> None:
    ids, state = run_ranks(dataset, 1, 6, gbs=8)
    more, _ = run_ranks(dataset, 1, 3, state, gbs=16)
    flat = [i for s in ids + more for i in s]
    full, _ = run_ranks(dataset, 1, 12, gbs=8)
    assert flat == [i for s in full for i in s][: len(flat)]


def test_load_state_dict_checks(dataset: Path, tmp_path: Path, prepare, docs) -> None:
    loader = make(dataset)
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"data\.seq_len=16"):
        make(dataset, seq_len=32).load_state_dict(state)
    with pytest.raises(DataError, match="not a kha-train-loader state"):
        loader.load_state_dict({"step": 3})
    other = tmp_path / "other"
    prepare(write_jsonl(tmp_path / "a.jsonl", docs[:100]), other, val_fraction=0.0)
    with pytest.raises(DataError, match=r"fingerprint.*resume with the original dataset"):
        make(other).load_state_dict(state)


def test_validation_split(dataset: Path) -> None:
    index = read_index(dataset)
    val_stream = read_split(index, "val")
    loaders = [make(dataset, split="val", rank=r, world_size=2) for r in range(2)]
    n = loaders[0].num_eval_batches
    assert n >= 3
    passes = [[b.sample_ids.tolist() for b in ld.eval_batches(3)] for ld in loaders]
    again = [[b.sample_ids.tolist() for b in ld.eval_batches(3)] for ld in loaders]
    assert passes == again  # the same data on every validation pass
    assert passes[0] == [[0, 1], [4, 5], [8, 9]] and passes[1] == [[2, 3], [6, 7], [10, 11]]
    b = next(iter(loaders[0].eval_batches(1)))
    assert b.input_ids[1].tolist() == val_stream[T : 2 * T].tolist()  # val tokens, not train
    assert len(list(loaders[0])) == n  # iterating a val loader: every full micro-batch once
    with pytest.warns(UserWarning, match="only"):
        assert len(list(loaders[0].eval_batches(n + 5))) == n


def test_prefetch_thread_stops_on_close(dataset: Path) -> None:
    before = threading.active_count()
    loader = make(dataset, prefetch=2)
    next(loader)
    assert threading.active_count() == before + 1
    loader.close()
    assert threading.active_count() == before
    val = make(dataset, split="val", prefetch=2)
    for _ in val.eval_batches(1):
        break
    assert threading.active_count() == before


def test_batch_lands_on_the_device(dataset: Path) -> None:
    loader = make(dataset, device="cpu")
    b = next(loader)
    assert b.input_ids.device.type == "cpu"
    if torch.cuda.is_available():
        gpu = make(dataset, device="cuda")
        assert next(gpu).input_ids.is_cuda


def test_bad_batch_geometry(dataset: Path) -> None:
    with pytest.raises(DataError, match="multiple of micro_batch_size x ranks = 2 x 2 = 4"):
        make(dataset, world_size=2, global_batch_size=6)
    with pytest.raises(DataError, match="fewer than one global batch") as e:
        make(dataset, global_batch_size=100_000)
    # The error suggests the largest batch that fits; it loads.
    n = make(dataset).num_samples
    fits = n // MB * MB
    assert f"set train.global_batch_tokens={fits * T} (at most {fits} samples" in str(e.value)
    make(dataset, global_batch_size=fits)
    # Not even one micro-batch at this seq_len: a shorter seq_len and a batch that fit.
    long = 4 * T
    m = make(dataset, seq_len=long, global_batch_size=MB).num_samples
    with pytest.raises(DataError, match=r"set data\.seq_len=\d+ train\.global_batch_tokens=") as e:
        make(dataset, seq_len=long, micro_batch_size=m + 1, global_batch_size=m + 1)
    seq, batch_tokens = (int(x) for x in re.findall(r"=(\d+)", str(e.value).split(": set ")[1]))
    assert seq < long and batch_tokens % seq == 0
    make(dataset, seq_len=seq, micro_batch_size=m + 1, global_batch_size=batch_tokens // seq)
    with pytest.raises(DataError, match="rank 2 is outside"):
        make(dataset, rank=2, world_size=2)
    assert np.int64(make(dataset).num_samples) > 0
