"""The loss curve of a run as a PNG, with loss spikes, skipped steps and rollbacks marked."""

from __future__ import annotations

import os
from pathlib import Path

from kha_train.training.loggers import read_jsonl


def plot_loss(metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path | None:
    """Draw train loss (and val loss, and the loss of each ``eval.sets`` text) against step from
    ``metrics.jsonl``; mark spikes with red crosses, non-finite steps with grey lines, steps the
    spike guard skipped with orange ones, and rollbacks (``train.rollback``) with a purple dashed
    line at the step the run went back to, the abandoned steps' loss (``rolled_back.jsonl``
    beside it) faded. Returns the PNG path, or None without data."""
    records = read_jsonl(metrics_path) if Path(metrics_path).exists() else []
    side = Path(metrics_path).with_name("rolled_back.jsonl")
    abandoned = read_jsonl(side) if side.exists() else []
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
    spike_skips = [r["step"] for r in records if r.get("type") == "spike_skip"]
    rollbacks = [r for r in records if r.get("type") == "rollback"]
    lost: dict[int, list[tuple[int, float]]] = {}  # rollback number -> its abandoned train losses
    for r in abandoned:
        if r.get("type") == "train" and _num(r.get("loss")):
            lost.setdefault(r.get("rolled_back_by", 0), []).append((r["step"], r["loss"]))
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
    for i, step in enumerate(spike_skips):
        ax.axvline(step, color="tab:orange", lw=0.6, alpha=0.5,
                   label="spike-skipped step" if i == 0 else None)  # fmt: skip
    at = dict(train)
    for r in rollbacks:  # each abandoned stretch starts where the run went back to
        if r.get("count") in lost and r["step"] in at:
            lost[r["count"]].insert(0, (r["step"], at[r["step"]]))
    for i, points in enumerate(lost.values()):
        ax.plot(*zip(*points), color="tab:purple", lw=1, alpha=0.35,
                label="rolled-back steps" if i == 0 else None)  # fmt: skip
    for i, r in enumerate(rollbacks):
        ax.axvline(r["step"], color="tab:purple", lw=1.2, ls="--", alpha=0.8,
                   label=f"rollback ({len(rollbacks)})" if i == 0 else None)  # fmt: skip
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
