"""The loss curve of a run as a PNG, with loss spikes and skipped (non-finite) steps marked."""

from __future__ import annotations

import os
from pathlib import Path

from kha_train.training.loggers import read_jsonl


def plot_loss(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path | None:
    """Draw train loss (and val loss, and the loss of each ``eval.sets`` text) against step from
    ``metrics.jsonl``; mark spikes with red crosses and skipped steps with grey lines. Returns
    the PNG path, or None without data."""
    records = read_jsonl(metrics_path) if Path(metrics_path).exists() else []
    train = [
        (r["step"], r["loss"]) for r in records if r.get("type") == "train" and _num(r.get("loss"))
    ]
    val = [
        (r["step"], r["val_loss"])
        for r in records
        if r.get("type") == "val" and _num(r.get("val_loss"))
    ]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("type") == "eval":
            for key, value in r.items():
                if key.endswith("/loss") and _num(value):
                    evals.setdefault(key[: -len("/loss")], []).append((r["step"], value))
    spikes = [r for r in records if r.get("type") == "spike"]
    skipped = [r["step"] for r in records if r.get("type") == "nonfinite"]
    if not train and not val:
        return None

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss (logging steps)", color="tab:blue", lw=1.5)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", color="tab:orange", ms=4)
    for name, points in evals.items():
        ax.plot(*zip(*points), "s--", label=f"eval {name} loss", ms=4)
    loss_spikes = [(s["step"], s["loss"]) for s in spikes if _num(s.get("loss"))]
    if loss_spikes:
        ax.scatter(*zip(*loss_spikes), marker="x", color="red", s=60, zorder=5,
                   label=f"spike ({len(spikes)})")  # fmt: skip
    for i, step in enumerate(skipped):
        ax.axvline(step, color="grey", lw=0.8, alpha=0.6,
                   label="skipped non-finite step" if i == 0 else None)  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
