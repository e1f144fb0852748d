"""One markdown table of throughput rows from a device call's outputs, ours and the peers', each
with the settings it ran under, for docs/performance.md.

    python scripts/perf_table.py OUT/ours_mb6x5.jsonl OUT/tt_amp_mb6x5.log OUT/ours_mb4x1.jsonl ...

Reads ``kha-train bench --json`` files (one JSON line per variant and precision) and the logs of
the peer scripts in ../shared/peers (torchtitan's ``RESULT ...`` line, Hugging Face's ``HF ...``
line), in the order given, gzipped or not (docs/results/throughput keeps them gzipped). Every row says tokens per optimizer step (micro-batch x accumulation
x sequence), precision, activation checkpointing, loss kernel and FSDP settings where they
apply, so that a row is only set beside another of the same tokens per step; the table says
when they differ. A second table splits the GPU time of each profiled row by part.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

TT = re.compile(
    r"RESULT torchtitan-(?P<version>\S+) .*?mode=(?P<mode>\S+) compile=(?P<compile>\S+) "
    r"seq=(?P<seq>\d+) mb=(?P<mb>\d+) accum=(?P<accum>\d+) clip=(?P<clip>\S+): "
    r"(?P<ms>[\d.]+) ms/step, (?P<tps>[\d,]+) tok/s, [\d.]+ TFLOP/s, MFU (?P<mfu>[\d.]+)%.*?"
    r"peak mem (?P<mem>[\d.]+) GiB"
)
HF = re.compile(
    r"HF Qwen3Moe attn=(?P<attn>\S+) seq=(?P<seq>\d+) mb=(?P<mb>\d+): (?P<ms>[\d.]+) ms/step, "
    r"(?P<tps>[\d,]+) tok/s, [\d.]+ TFLOP/s, MFU (?P<mfu>[\d.]+)%.*?mem (?P<mem>[\d.]+) GiB"
)
COLUMNS = ("system", "tokens / step (mb x accum x seq)", "settings", "step ms", "tokens/s",
           "MFU", "peak mem")  # fmt: skip


def _text(path: Path) -> str:
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes()).decode(errors="replace")
    return path.read_text(errors="replace")


def _kind(path: Path) -> str:
    """The file's kind by its name, a ``.gz`` ending aside: ``.jsonl`` (ours) or a log."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def ours(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``kha-train bench --json`` file (a failed run: its error)."""
    rows = []
    for line in _text(path).splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        s = r.get("settings", {})
        mb, accum, seq = s.get("micro_batch"), s.get("accum"), s.get("seq_len")
        kha = "KHA-MLP on V" if r.get("variant") == "kha" else "no KHA"
        ac = s.get("ac", "none")
        ac = f"every {s.get('ac_every_n')}" if ac == "every_n" else ac
        settings = [r.get("precision", "bf16"), f"AC {ac}",
                    f"loss {s.get('loss_kernel', 'chunked')}"]  # fmt: skip
        if s.get("mode") == "single":
            settings.append("single device (no FSDP2)")
        if s.get("reshard"):
            settings.append("reshard_after_forward")
        if s.get("defer_sync") is False:
            settings.append("gradient sync every micro-batch")
        if r.get("precision") == "fp8":
            f = s.get("fp8", {})
            settings.append(f"fp8 {f.get('recipe')} dims >= {f.get('min_dim')}")
        if r.get("deterministic"):
            settings.append("deterministic")
        if r.get("alloc_retries"):  # cudaMalloc failed, cache flushed: each costs a device sync
            timed = r.get("alloc_retries_timed")  # files before it counted warm-up and compile too
            settings.append(f"{r['alloc_retries']} allocator retries"
                            + (f" ({timed} in the timed steps)" if timed is not None else ""))  # fmt: skip
        rows.append({
            "system": f"kha-train, {kha}", "mb": mb, "accum": accum, "seq": seq,
            "settings": ", ".join(settings), "ms": r.get("step_ms"),
            "tps": r.get("tokens_per_s"), "mfu": r.get("mfu"), "mem": r.get("peak_mem_gib"),
            "error": r.get("error"), "breakdown": r.get("breakdown_ms"),
        })  # fmt: skip
    return rows


def peer(path: Path) -> list[dict[str, Any]]:
    """The result line of a peer script's log (none: the run failed; its last line says why)."""
    text = _text(path)
    for m in TT.finditer(text):
        mode = {"amp": "fp32 params + bf16 autocast", "bf16": "bf16 params"}.get(
            m["mode"], m["mode"]
        )
        return [_peer_row(m, f"torchtitan {m['version']}", f"{mode}, compile {m['compile']}")]
    for m in HF.finditer(text):
        return [_peer_row(m, "HF transformers", f"bf16 params, attention {m['attn']}", accum=1)]
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "empty log")
    return [{"system": path.name.split(".")[0], "error": last.strip()[:200]}]


def _peer_row(m: re.Match[str], system: str, settings: str, accum: int | None = None) -> dict:
    return {
        "system": system, "mb": int(m["mb"]), "accum": accum or int(m["accum"]),
        "seq": int(m["seq"]), "settings": settings, "ms": float(m["ms"]),
        "tps": float(m["tps"].replace(",", "")), "mfu": float(m["mfu"]) / 100,
        "mem": float(m["mem"]), "error": None,
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['system']} | | failed: {r['error']} | | | | |")
            continue
        tokens = r["mb"] * r["accum"] * r["seq"]
        lines.append(
            f"| {r['system']} | {tokens:,} ({r['mb']} x {r['accum']} x {r['seq']}) | "
            f"{r['settings']} | {r['ms']:.1f} | {r['tps'] / 1e3:.1f}k | {r['mfu']:.1%} | "
            f"{r['mem']:.1f} GiB |"
        )
    sizes = {r["mb"] * r["accum"] * r["seq"] for r in rows if not r.get("error")}
    if len(sizes) > 1:
        lines.append("")
        lines.append("Tokens per optimizer step differ between rows: compare only rows with the "
                     "same figure.")  # fmt: skip
    return "\n".join(lines)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """GPU time per step by part (the profiler's categories, ms and share) of the profiled rows;
    empty when no row was profiled."""
    profiled = [r for r in rows if r.get("breakdown") and not r.get("error")]
    if not profiled:
        return ""
    parts = list(dict.fromkeys(k for r in profiled for k in sorted(
        r["breakdown"], key=lambda k: -r["breakdown"][k])))  # fmt: skip
    lines = ["| system | settings | GPU ms / step | " + " | ".join(parts) + " |",
             "|" + "---|" * (len(parts) + 3)]  # fmt: skip
    for r in profiled:
        total = sum(r["breakdown"].values())
        cells = [f"{r['breakdown'][k]:.1f} ({r['breakdown'][k] / total:.0%})"
                 if k in r["breakdown"] else "" for k in parts]  # fmt: skip
        tokens = f"{r['mb']} x {r['accum']} x {r['seq']}"
        lines.append(f"| {r['system']} ({tokens}) | {r['settings']} | {total:.1f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="bench .jsonl files and peer .log files")
    args = p.parse_args(argv)
    rows = []
    for path in args.files:
        if not path.is_file():
            raise SystemExit(f"{path} does not exist")
        rows += ours(path) if _kind(path) == ".jsonl" else peer(path)
    print(table(rows))
    breakdown = breakdown_table(rows)
    if breakdown:
        print("\nWhere the GPU time of a step goes (profiled rows):\n")
        print(breakdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
