"""The report of `kha-train eval` (evaluate.py): per-source sums of NLL, tokens and bytes, the
figures made of them (loss, perplexity, bits per byte), the table and the JSON. Torch-free: the
CLI imports evaluate.py, and so this, to build its parser. The scoring: training/scoring.py."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kha_train.config import Config
    from kha_train.training.scoring import DocScore


def figures(nll: float, tokens: int, nbytes: int) -> dict[str, Any]:
    """Loss (mean NLL per token, nats), perplexity and bits per byte of a sum of NLLs."""
    loss = nll / tokens if tokens else float("nan")
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "nll": nll,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bpb": nll / (math.log(2) * nbytes) if nbytes else None,
    }


@dataclass
class SourceResult:
    name: str
    kind: str
    path: str
    split: str | None
    docs: int = 0
    tokens: int = 0
    nbytes: int = 0
    nll: float = 0.0
    per_doc: list[dict[str, Any]] = field(default_factory=list)

    def add(self, i: int, s: DocScore, per_doc: bool = False) -> None:
        self.docs += 1
        self.tokens += s.tokens
        self.nbytes += s.nbytes
        self.nll += s.nll
        if per_doc:
            self.per_doc.append({"doc": i, **figures(s.nll, s.tokens, s.nbytes)})

    def to_dict(self, per_doc: bool) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "path": self.path, "split": self.split,
               "docs": self.docs, **figures(self.nll, self.tokens, self.nbytes)}  # fmt: skip
        if per_doc:
            out["per_doc"] = self.per_doc
        return out


def build_report(
    ckpt: Path, cfg: Config, settings: dict[str, Any], results: list[SourceResult], per_doc: bool
) -> dict[str, Any]:
    from kha_train.training.checkpoint_checks import STEP_DIR

    m = STEP_DIR.match(ckpt.name)
    totals = SourceResult("overall", "all", "", None)
    for r in results:
        totals.docs += r.docs
        totals.tokens += r.tokens
        totals.nbytes += r.nbytes
        totals.nll += r.nll
    overall = totals.to_dict(False)
    for key in ("name", "kind", "path", "split"):
        overall.pop(key)
    return {
        "model": {
            "checkpoint": str(ckpt),
            "step": int(m.group(1)) if m and ckpt.is_dir() else None,
            "name": cfg.name,
            "vocab_size": cfg.model.vocab_size,
        },
        "settings": settings,
        "sources": [r.to_dict(per_doc) for r in results],
        "overall": overall,
    }


def print_report(report: dict[str, Any], per_doc: bool = False, file: Any = None) -> None:
    file = file or sys.stdout
    m, st = report["model"], report["settings"]
    step = f" (step {m['step']})" if m["step"] is not None else ""
    print(
        f"eval {m['checkpoint']}{step}: window {st['window']}, stride {st['stride']}, "
        f"{st['device']} {st['precision']}",
        file=file,
    )
    rows = [(s["name"], s) for s in report["sources"]] + [("overall", report["overall"])]
    width = max(len(n) for n, _ in rows)
    head = f"{'source':<{width}}  {'docs':>7}  {'tokens':>11}  {'bytes':>12}  {'loss':>7}  "
    print(head + f"{'ppl':>9}  {'bpb':>6}", file=file)
    for name, s in rows:
        print(f"{name:<{width}}  {_line(s)}", file=file)
        if per_doc and "per_doc" in s:
            for d in s["per_doc"]:
                print(f"{'  doc ' + str(d['doc']):<{width}}  {_line({**d, 'docs': 1})}", file=file)


def _line(s: dict[str, Any]) -> str:
    bpb = f"{s['bpb']:6.4f}" if s["bpb"] is not None else f"{'-':>6}"
    return (
        f"{s['docs']:>7,}  {s['tokens']:>11,}  {s['bytes']:>12,}  {s['loss']:7.4f}  "
        f"{s['perplexity']:9.3f}  {bpb}"
    )


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` atomically (a temporary file, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
