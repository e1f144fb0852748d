"""Helpers of the trainer tests (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


def prepare_tiny_dataset(root: Path) -> Path:
    """A tokenizer (vocab 512) and a prepared dataset with a val split, from the pydoc topics."""
    from pydoc_data.topics import topics

    from kha_train.data.prepare import PrepareOptions, prepare_dataset
    from kha_train.data.sources import SourceSpec
    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer

    docs = [t.strip() for _, t in sorted(topics.items()) if len(t.strip()) > 200]
    tok = save_tokenizer(
        train_tokenizer(docs, VOCAB),
        root / "tokenizer.json",
        eos_token="<|endoftext|>",
        pad_token=None,
    )
    src = root / "src.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = root / "data"
    # One process: forking the (threaded) pytest process for workers can deadlock.
    opts = PrepareOptions(
        out=str(out), tokenizer=str(tok), val_fraction=0.1, progress=False, num_proc=1
    )
    prepare_dataset(SourceSpec(spec=str(src)), opts)
    return out


def tiny_config(run_dir: Path, dataset: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 2-layer MoE (4 experts top-2, KHA-MLP on V) on the tiny dataset: 4 micro-batches of
    2 x 32 tokens per step on one rank, 2 per rank on two."""
    cfg: dict[str, Any] = {
        "name": "tiny-test",
        "model": {
            "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_dim": 16, "ffn_size": 128, "rope_theta": 10000.0,
            "attn_backend": "math",
            "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_size": 64,
                    "bias_update_rate": 0.01},
            "kha": {"variant": "mlp", "targets": ["v"]},
        },
        "data": {"dataset": str(dataset), "seq_len": 32, "prefetch": 1},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"global_batch_tokens": 256, "micro_batch_size": 2, "max_steps": 6,
                  "precision": "fp32", "device": "cpu", "val_every": 0, "val_batches": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "logging": {"run_dir": str(run_dir), "log_every": 1, "wandb": "disabled",
                    "spikes": {"window": 16, "warmup": 4}},
    }  # fmt: skip
    for name, values in sections.items():
        _merge(cfg.setdefault(name, {}), values)
    return cfg


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def build(cfg: dict[str, Any]):
    from kha_train.config import build_config

    return build_config([("test", cfg)])


def train_here(cfg: dict[str, Any], trainer_cls: type | None = None, console: Any = None) -> Any:
    """Train ``cfg`` to the end in this process (``trainer_cls``: a Trainer subclass that
    injects faults; ``console``: a stream for its console lines), then free everything a run
    holds, the process group and torch's deterministic switch (``train.deterministic`` is
    process-wide) included. Returns the trainer (closed), for its state."""
    import io

    import torch

    from kha_train.training import distributed as D
    from kha_train.training.trainer import Trainer

    trainer = (trainer_cls or Trainer)(build(cfg), console=console or io.StringIO())
    try:
        trainer.train()
    finally:
        trainer.close()
        D.teardown()
        torch.use_deterministic_algorithms(False)
    return trainer


def records(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in recs if r.get("type") == kind]


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl (log_every=1)."""
    return {r["step"]: r["loss"] for r in records(run_dir)}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WANDB_API_KEY", None)
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--standalone", *args,
    ]  # fmt: skip


def run_process(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    return proc
