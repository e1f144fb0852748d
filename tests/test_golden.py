"""Golden regression test: the first 20 training losses of the tiny config, pinned.

Builds the quickstart data exactly as ``make train`` does (``kha-train tokenizer train --source
builtin --vocab-size 8192`` then ``kha-train data prepare --source builtin``), trains
``configs/tiny/kha_moe.yaml`` for 20 steps on CPU in fp32 through ``kha-train train`` (in
process: the code path users run), and compares each step's loss and the final grad norm with
``tests/golden/tiny_losses.json``. Any change to the model, the optimizer, the schedule, the data
order or the trainer's arithmetic moves these numbers; a pure refactor must not.

The run is the tiny config with :data:`OVERRIDES` (20 steps, every step logged, no W&B, no
periodic checkpoints, and a global batch of 1024 tokens instead of 8192: 20 steps take ~12 s of
CPU instead of over 2 min; the config's two micro-batches per step are kept).

Regenerate the golden file on purpose, after a change that is meant to alter training (review
the diff of the JSON before committing it)::

    KHA_UPDATE_GOLDEN=1 OMP_NUM_THREADS=2 .venv/bin/python -m pytest tests/test_golden.py

The builtin corpus is read from the running CPython's standard library, so another Python
version trains on other text: the test is skipped (with the reason) when the corpus key differs
from the one recorded in the golden file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from kha_train.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "kha_moe.yaml"
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_losses.json"
UPDATE = os.environ.get("KHA_UPDATE_GOLDEN", "") not in ("", "0")
STEPS = 20

# Config overrides of the golden run, besides data.dataset and logging.run_dir (tmp paths).
OVERRIDES = [
    f"train.max_steps={STEPS}",
    "train.global_batch_tokens=1024",  # 2 micro-batches x 2 x 256 tokens (the config: x 16)
    "train.micro_batch_size=2",
    "train.device=cpu",
    "train.precision=fp32",
    "train.val_every=0",
    "logging.log_every=1",  # a window of one step: the logged loss is that step's loss
    "logging.wandb=disabled",
    "checkpoint.resume=none",
    "checkpoint.every_steps=0",
]

# Tolerances (relative). Measured on 2 cores (torch 2.13.0+cpu, MKL): OMP_NUM_THREADS=2 and 4
# give bit-identical runs; OMP_NUM_THREADS=1 differs in the last bits from the first backward
# on (grad norm at step 1: 1e-7 relative), because the thread count changes the reduction order
# of the matmuls. Top-k routing turns such rounding noise into a chaotic divergence that grows
# ~10x every 3 steps: the loss spread is <= 7e-8 over steps 1-10 but reaches 2.3e-5 at step 19
# (6e-6 at step 20), and the step-20 grad norm differs by 4.8e-4. Another CPU (AVX2 vs AVX-512
# kernels) perturbs the first steps by the same ~1e-7, so the tolerances below leave >= 1000x
# margin early and ~40x late. A real behaviour change moves the loss by far more: one step
# lowers it by 2-4% early on, so a 1% change of the update shows above 1e-4 within steps 2-10
# (measured: optim.lr +1% fails from step 3 on, model.moe.bias_update_rate +1% at steps 5 and
# 8-10, optim.lr +10% at every step from 2 to 20).
LOSS_RTOL_EARLY = 1e-4  # steps 1-10: before routing noise can grow
LOSS_RTOL_LATE = 1e-3  # steps 11-20
EARLY_STEPS = 10
GRAD_NORM_RTOL = 1e-2  # the final (step-20) grad norm: more sensitive than the mean loss


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart data (Makefile: $(DATA)/tokenizer.json, $(DATA)/index.json), built in
    process with one tokenizing process (forking the threaded pytest process can deadlock)."""
    data = tmp_path_factory.mktemp("golden_data")
    tok = str(data / "tokenizer.json")
    rc = main(["tokenizer", "train", "--source", "builtin", "--vocab-size", "8192",
               "--out", tok, "--no-progress"])  # fmt: skip
    assert rc == 0, "kha-train tokenizer train failed"
    rc = main(["data", "prepare", "--source", "builtin", "--tokenizer", tok, "--out", str(data),
               "--num-proc", "1", "--no-progress"])  # fmt: skip
    assert rc == 0, "kha-train data prepare failed"
    return data


def _data_facts(data: Path) -> dict[str, Any]:
    index = json.loads((data / "index.json").read_text())
    train = index["splits"]["train"]
    sha = hashlib.sha256()
    for shard in train["shards"]:
        sha.update((data / shard["file"]).read_bytes())
    return {
        "corpus_key": index["source"]["fingerprint"],
        "tokenizer_hash": index["tokenizer"]["hash"],
        "train_tokens": train["tokens"],
        "train_sha256": sha.hexdigest()[:16],
    }


def _train(data: Path, run_dir: Path) -> list[dict[str, Any]]:
    """Train through `kha-train train`; the per-step train records of metrics.jsonl."""
    rc = main(["train", str(CONFIG), f"data.dataset={data}", f"logging.run_dir={run_dir}",
               *OVERRIDES])  # fmt: skip
    assert rc == 0, "kha-train train failed"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r.get("type") == "train"]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), "not one record per step"
    return recs


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _write_golden(facts: dict[str, Any], recs: list[dict[str, Any]]) -> None:
    golden = {
        "description": "kha-train train configs/tiny/kha_moe.yaml on the builtin corpus, CPU, "
        "fp32: the loss of each of the first 20 steps and the grad norm (before clipping) of "
        "each step; tests/test_golden.py compares them",
        "regenerate": "KHA_UPDATE_GOLDEN=1 OMP_NUM_THREADS=2 .venv/bin/python -m pytest "
        "tests/test_golden.py",
        "command": "kha-train tokenizer train --source builtin --vocab-size 8192 --out "
        "DATA/tokenizer.json; kha-train data prepare --source builtin --tokenizer "
        "DATA/tokenizer.json --out DATA --num-proc 1; kha-train train configs/tiny/kha_moe.yaml "
        "data.dataset=DATA logging.run_dir=RUN " + " ".join(OVERRIDES),
        "config": "configs/tiny/kha_moe.yaml",
        "overrides": OVERRIDES,
        "data": facts,
        "generated": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
        "losses": [r["loss"] for r in recs],
        "grad_norms": [r["grad_norm"] for r in recs],
        "final_grad_norm": recs[-1]["grad_norm"],
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")


@pytest.mark.slow
def test_tiny_losses_match_golden(builtin_dataset: Path, tmp_path: Path) -> None:
    facts = _data_facts(builtin_dataset)
    if UPDATE:
        _write_golden(facts, _train(builtin_dataset, tmp_path / "run"))
        return
    golden = json.loads(GOLDEN.read_text())
    if facts["corpus_key"] != golden["data"]["corpus_key"]:
        pytest.skip(
            f"the builtin corpus here is {facts['corpus_key']}, the golden losses were made on "
            f"{golden['data']['corpus_key']} (the corpus is this Python's stdlib docs)"
        )
    assert golden["overrides"] == OVERRIDES, (
        "OVERRIDES changed since the golden file was written: regenerate it (module docstring)"
    )
    assert facts == golden["data"], (
        f"the prepared data differ from the golden run's (tokenizer or tokenization changed): "
        f"{facts} vs {golden['data']}"
    )

    recs = _train(builtin_dataset, tmp_path / "run")
    gen = golden["generated"]
    where = (
        f"(here: torch {torch.__version__}, {torch.get_num_threads()} threads; golden: torch "
        f"{gen['torch']}, {gen['torch_threads']} threads, {gen['date']}). If the change is "
        "intended, regenerate: KHA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py"
    )
    bad = []
    for step, (want, rec) in enumerate(zip(golden["losses"], recs, strict=True), start=1):
        tol = LOSS_RTOL_EARLY if step <= EARLY_STEPS else LOSS_RTOL_LATE
        rel = abs(rec["loss"] - want) / abs(want)
        if not rel <= tol:  # also catches NaN
            bad.append(f"step {step}: loss {rec['loss']:.8f}, golden {want:.8f}, "
                       f"rel diff {rel:.2e} > {tol:.0e}")  # fmt: skip
    assert not bad, "training losses moved from the golden run " + where + ":\n" + "\n".join(bad)

    want, got = golden["final_grad_norm"], recs[-1]["grad_norm"]
    rel = abs(got - want) / abs(want)
    assert rel <= GRAD_NORM_RTOL, (
        f"step-{STEPS} grad norm {got:.6f}, golden {want:.6f}: rel diff {rel:.2e} > "
        f"{GRAD_NORM_RTOL:.0e} " + where
    )
