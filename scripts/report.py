"""Tables and plots of a study from its archived runs (docs/results/<study>/<run>/), for
study.py's ``report`` command.

Writes ``docs/results/<study>.md`` (one row per variant: mean over seeds, the seed spread
(max - min), the difference to the baseline seed by seed and whether its mean exceeds the larger
of the two spreads, spikes, router health, speed) and PNGs beside it: training loss curves with
spikes marked, held-out bits per byte per run, the expert-load max violation over training, and
heatmaps of the learned KHA matrices.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

COLORS = ["tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange", "tab:brown"]


def _load(run: Path) -> dict[str, Any]:
    r = json.loads((run / "results.json").read_text())
    r["archive"] = run
    r.setdefault("status", "completed")  # archives from before the runner recorded it
    r["records"] = _read_jsonl_gz(run / "metrics.jsonl.gz")
    side = run / "rolled_back.jsonl.gz"  # the steps that rollbacks abandoned (study.py)
    r["rolled_back"] = _read_jsonl_gz(side) if side.is_file() else []
    return r


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _spikes(d: dict[str, Any]) -> int:
    """Spikes the run's detector flagged, those of the steps a rollback abandoned included (the
    run's own count, ``spikes_total``, is restored with the checkpoint and so forgets them)."""
    return d["spikes"] + sum(r.get("type") == "spike" for r in d.get("rolled_back", []))


def _finished(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that trained to the end and were evaluated (not diverged, study.py)."""
    return [d for d in ds if d["final"]["eval_bpb"] is not None]


def _failed(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in ds if d["final"]["eval_bpb"] is None]


def _stats(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(max(xs) - min(xs)) if len(xs) > 1 else float("nan")


def _paired(ds: list[dict[str, Any]], base: list[dict[str, Any]]) -> tuple[str, str]:
    """The difference to the baseline in held-out bpb, seed by seed (every variant sees the same
    data order, so a seed's pair differs only in the variant), and whether its mean exceeds
    the larger seed spread (max - min) of the two on those seeds, and whether every seed's
    difference has the same sign: ("-0.0024 (s1 -0.0019, s2 -0.0029)", "no; same sign in all
    2 seeds" | "yes; signs differ" | ... | "n/a (1 seed)"); ("", "") without a seed in common."""
    base_by_seed = {d["seed"]: d["final"]["eval_bpb"] for d in base}
    own = {d["seed"]: d["final"]["eval_bpb"] for d in ds if d["seed"] in base_by_seed}
    if not own:
        return "", ""
    seeds = sorted(own)
    deltas = [own[s] - base_by_seed[s] for s in seeds]
    mean = float(np.mean(deltas))
    text = f"{mean:+.4f}" + (
        " (" + ", ".join(f"s{s} {x:+.4f}" for s, x in zip(seeds, deltas)) + ")" if len(seeds) > 1
        else f" (s{seeds[0]})"
    )  # fmt: skip
    if len(seeds) < 2:
        return text, "n/a (1 seed)"
    spread = max(_stats([own[s] for s in seeds])[1], _stats([base_by_seed[s] for s in seeds])[1])
    same = all(x < 0 for x in deltas) or all(x > 0 for x in deltas)  # the pairs' own view
    signs = f"same sign in all {len(seeds)} seeds" if same else "signs differ"
    return text, f"{'yes' if abs(mean) > spread else 'no'}; {signs}"


def write_report(
    study: str,
    spec: dict[str, Any],
    runs: list[Path],
    results: Path,
    borrowed: dict[Path, str] | None = None,
) -> Path:
    """``borrowed``: archives of other studies shown as the variant of the given label (their
    own variant and run names are replaced; study.py's ``borrowed``)."""
    data = [_load(r) for r in runs]
    for path, label in (borrowed or {}).items():
        d = _load(path)
        d["run"] = f"{label}-s{d['seed']}"
        d["variant"] = label
        d["borrowed"] = True  # its KHA heatmaps are drawn by its own study's report
        data.append(d)
    order = [*(borrowed or {}).values(), *spec["variants"]]
    variants = list(dict.fromkeys(v for v in order if any(d["variant"] == v for d in data)))
    baseline = spec.get("baseline", next(iter(spec["variants"])))
    by_variant = {v: [d for d in data if d["variant"] == v] for v in variants}

    lines = [f"## Study `{study}`", "", _provenance(data), ""]
    lines += [
        "| variant | seeds | held-out bpb (mean, spread) | held-out loss | vs baseline (bpb, same seeds) | "
        "beyond seed spread | spikes | max violation (max / last) | expert choices moved by "
        "the bias | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        ds, failed = _finished(by_variant[v]), _failed(by_variant[v])
        runs = f"{len(ds) + len(failed)}" + (f" ({len(failed)} diverged)" if failed else "")
        if not ds:  # every seed diverged: when and how
            how = ", ".join(f"{d['status']} at step {d['steps']}" for d in failed)
            lines.append(f"| {v} | {runs} | diverged: {how} | | | | "
                         f"{sum(_spikes(d) for d in failed)} | | | |")  # fmt: skip
            continue
        bpb = _stats([d["final"]["eval_bpb"] for d in ds])
        loss = _stats([d["final"]["eval_loss"] for d in ds])
        diff, beyond = "", ""
        own = spec.get("baselines", {}).get(v, baseline)  # e.g. the baseline at the same LR
        base = _finished(by_variant.get(own, []))
        if base and v != own:
            diff, beyond = _paired(ds, base)
            diff += f" vs {own}" if own != baseline and diff else ""
        flips = [d["analysis"].get("router", {}).get("flip_fraction_mean") for d in ds]
        flips = [f for f in flips if f is not None]
        vio_max = max(d["max_violation_max"] or 0 for d in ds)
        vio_last = np.mean([d["max_violation_last"] or 0 for d in ds])
        lines.append(
            f"| {v} | {runs} | {bpb[0]:.4f} ({_fmt(bpb[1])}) | {loss[0]:.4f} ({_fmt(loss[1])}) "
            f"| {diff} | {beyond} | {sum(_spikes(d) for d in ds)} | {vio_max:.2f} / "
            f"{vio_last:.2f} | {np.mean(flips) if flips else float('nan'):.1%} | "
            f"{np.mean([d['tokens_per_s'] or 0 for d in ds]) / 1e3:.0f}k |"
        )
    lines += _in_loop_table(data, variants, spec, baseline)
    defended = [d for d in data if any(k.startswith(("optim.skip_step", "train.rollback",
                                                     "optim.clip_mode")) for k in d["overrides"])]  # fmt: skip
    if defended:
        lines += _defenses_table(data)
    vh = [d for d in data if "virtual_heads" in d["analysis"]]
    if vh:
        lines += ["", "MEA, KV cache halved by `kha-train virtual-heads` (same val split):", ""]
        lines += [
            "| run | held-out loss | after halving | bpb | after halving | K / V kept by the "
            "factorisation (mean over layers) |",
            "|---|---|---|---|---|---|",
        ]
        for d in vh:
            a = d["analysis"]["virtual_heads"]
            kept = a.get("kept_energy")
            share = f"{np.mean(kept['k']):.1%} / {np.mean(kept['v']):.1%}" if kept else "-"
            lines.append(f"| {d['run']} | {d['final']['eval_loss']:.4f} | {a['eval_loss']:.4f} | "
                         f"{d['final']['eval_bpb']:.4f} | {a['eval_bpb']:.4f} | {share} |")  # fmt: skip
    pngs = _plots(study, data, variants, results)
    if defended:
        pngs.insert(1, _grad_norm_plot(study, data, variants, results))
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    out = results / f"{study}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {len(pngs)} plots")
    return out


def _in_loop_table(
    data: list[dict[str, Any]], variants: list[str], spec: dict[str, Any], baseline: str
) -> list[str]:
    """The paired difference to the baseline at every in-loop evaluation (the trainer's
    eval.sets.val), per seed: is a gain there throughout training, in every seed?"""

    def curve(d: dict[str, Any]) -> dict[int, float]:
        return {r["step"]: r["val/bpb"] for r in d["records"]
                if r.get("type") == "eval" and r.get("val/bpb")}  # fmt: skip

    cols: dict[str, dict[int, list[str]]] = {}
    for v in variants:
        own = spec.get("baselines", {}).get(v, baseline)
        if v == own:
            continue
        for d in _finished([x for x in data if x["variant"] == v]):
            base = next((b for b in _finished(data) if b["variant"] == own
                         and b["seed"] == d["seed"]), None)  # fmt: skip
            if base is None:
                continue
            mine, theirs = curve(d), curve(base)
            name = v if own == baseline else f"{v} (vs {own})"
            for step in sorted(set(mine) & set(theirs)):
                cols.setdefault(name, {}).setdefault(step, []).append(
                    f"s{d['seed']} {mine[step] - theirs[step]:+.4f}")  # fmt: skip
    if not cols:
        return []
    steps = sorted({s for c in cols.values() for s in c})
    out = ["", "In-loop held-out bits per byte against the baseline of the same seed, at each "
           "evaluation:", "",
           "| step | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
    for step in steps:
        out.append(f"| {step} | " + " | ".join(", ".join(c.get(step, [])) for c in cols.values())
                   + " |")  # fmt: skip
    return out


def _defenses_table(data: list[dict[str, Any]]) -> list[str]:
    """Per run: spikes flagged, updates skipped, rollbacks, steps redone after them, batches of
    data skipped, and the tokens of compute they cost (skipped + redone steps)."""
    lines = ["", "Spike defenses, per run:", "",
             "| run | spikes flagged | updates skipped | rollbacks | steps redone | batches of "
             "data skipped | tokens of compute lost | held-out bpb |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in data:
        f = d.get("defenses", {})
        skipped = f.get("spike_skipped", 0) + (d.get("nonfinite_skipped") or 0)
        lost = (skipped + f.get("steps_redone", 0)) * d["tokens"] / max(d["steps"], 1)
        lines.append(f"| {d['run']} | {_spikes(d)} | {skipped} | {f.get('rollbacks', 0)} | "
                     f"{f.get('steps_redone', 0)} | {f.get('data_steps_skipped', 0)} | "
                     f"{lost / 1e6:.1f}M | {_bpb(d)} |")  # fmt: skip
    return lines


def _bpb(d: dict[str, Any]) -> str:
    bpb = d["final"]["eval_bpb"]
    return f"{bpb:.4f}" if bpb is not None else f"diverged ({d['status']}, step {d['steps']})"


def _fmt(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.4f}"


def _provenance(data: list[dict[str, Any]]) -> str:
    envs = {(d["environment"].get("device", "cpu"), d["environment"]["torch"],
             d["environment"]["commit"], d["environment"]["date"]) for d in data}  # fmt: skip
    where = "; ".join(f"{dev}, torch {t}, commit {c}, {day}" for dev, t, c, day in sorted(envs))
    tokens = sorted({d["tokens"] for d in data})
    return (f"{len(data)} runs, {', '.join(f'{t / 1e6:.0f}M' for t in tokens)} tokens each. "
            f"Ran on: {where}. Held-out figures: `kha-train eval` on the corpus's val split.")  # fmt: skip


def _plots(
    study: str, data: list[dict[str, Any]], variants: list[str], results: Path
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = {v: COLORS[i % len(COLORS)] for i, v in enumerate(variants)}
    seeds = sorted({d["seed"] for d in data})  # the first solid, the others dashed
    marker = {s: "os^Dv"[i % 5] for i, s in enumerate(seeds)}
    out = []

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), dpi=100)
    for d in data:
        train = [(r["step"], r["loss"]) for r in d["records"] if r.get("type") == "train"]
        style = "-" if d["seed"] == seeds[0] else "--"
        for a in (ax, ax2):
            a.plot(*zip(*train), style, color=color[d["variant"]], lw=1,
                   label=d["run"])  # fmt: skip
        kept_and_lost = d["records"] + d["rolled_back"]  # a rollback's spikes are in the second
        spikes = [(r["step"], r["loss"]) for r in kept_and_lost if r.get("type") == "spike"]
        if spikes:
            ax.scatter(*zip(*spikes), marker="x", color=color[d["variant"]], s=40, zorder=5)
        skips = [(r["step"], r["loss"]) for r in kept_and_lost if r.get("type") == "spike_skip"]
        if skips:  # updates the spike guard did not apply
            ax.scatter(*zip(*skips), marker="v", color=color[d["variant"]], s=30, zorder=5)
        for r in d["records"]:
            if r.get("type") == "rollback":  # from the step that triggered it back to to_step
                ax.axvspan(r["to_step"], r["from_step"], color=color[d["variant"]], alpha=0.15)
    steps = max(r["step"] for d in data for r in d["records"] if r.get("type") == "train")
    ax2.set_xlim(steps * 0.5, steps)
    tail = [
        r["loss"]
        for d in data
        for r in d["records"]
        if r.get("type") == "train" and r["step"] > steps * 0.5 and np.isfinite(r["loss"])
    ]
    if tail:
        ax2.set_ylim(min(tail) - 0.02, np.percentile(tail, 95) + 0.02)
    ax.set_title(f"{study}: training loss (x: spikes, v: skipped, band: rolled back)")
    ax2.set_title("second half")
    for a in (ax, ax2):
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    ax.set_ylabel("loss (nats)")
    ax2.legend(fontsize=7)
    out.append(_save(fig, results / f"{study}_loss.png"))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), dpi=100)
    for d in data:  # in-loop evaluation (eval.sets.val): bits per byte over training
        pts = [(r["step"], r["val/bpb"]) for r in d["records"]
               if r.get("type") == "eval" and r.get("val/bpb")]  # fmt: skip
        if pts:
            style = "-" if d["seed"] == seeds[0] else "--"
            ax2.plot(*zip(*pts), style, marker=marker[d["seed"]], color=color[d["variant"]], ms=3,
                     lw=1, label=d["run"])  # fmt: skip
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out bits per byte (in-loop, first 500k tokens)")
    ax2.grid(alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    for s in seeds:  # a seed's runs share their data order: a thin line joins them
        pts = [(i, d["final"]["eval_bpb"]) for i, v in enumerate(variants)
               for d in _finished(data) if d["variant"] == v and d["seed"] == s]  # fmt: skip
        if len(pts) > 1:
            ax.plot(*zip(*pts), "-", color="0.75", lw=0.8, zorder=1)
    for i, v in enumerate(variants):
        ds = [d for d in _finished(data) if d["variant"] == v]
        if not ds:
            continue
        for d in ds:
            ax.scatter(i, d["final"]["eval_bpb"], color=color[v], s=40, marker=marker[d["seed"]],
                       zorder=3, label=f"seed {d['seed']}" if i == 0 else None)  # fmt: skip
        ax.hlines(np.mean([d["final"]["eval_bpb"] for d in ds]), i - 0.3, i + 0.3, color=color[v])
    ax.set_xticks(range(len(variants)), variants, rotation=20)
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"{study}: held-out bits per byte (marker: seed, bar: mean)")
    if len(seeds) > 1 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out.append(_save(fig, results / f"{study}_bpb.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for d in data:
        vio = [(r["step"], r["moe_max_violation_mean"]) for r in d["records"]
               if r.get("type") == "train" and "moe_max_violation_mean" in r]  # fmt: skip
        if vio:
            ax.plot(*zip(*vio), color=color[d["variant"]], lw=0.8, label=d["run"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max violation (mean over layers)")
    ax.set_title(f"{study}: expert load balance over training")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    out.append(_save(fig, results / f"{study}_load.png"))

    heat = [(d, d["archive"] / "kha.npz") for d in data if "borrowed" not in d]
    heat = [(d, p) for d, p in heat if p.is_file() and d["seed"] == min(
        x["seed"] for x in data if x["variant"] == d["variant"])]  # fmt: skip
    for d, path in heat:
        mats = np.load(path)
        names = sorted(mats.files)
        layers = sorted({n.split(".")[1] for n in names}, key=int)
        picks = [n for n in names if n.split(".")[1] in (layers[0], layers[-1])]
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), dpi=100,
                                 squeeze=False)  # fmt: skip
        dist = d["analysis"]["kha"]["distance_from_init"]
        for a, n in zip(axes[0], picks):
            w = mats[n] - (0 if n.endswith("w_gate") else np.eye(mats[n].shape[0]))
            lim = np.abs(w).max() or 1.0
            a.imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim)
            short = n.replace("layers.", "L").replace(".attn.", " ")
            a.set_title(f"{short}\n|W - W0| / |I| = {dist[n]:.3f}", fontsize=8)
            a.axis("off")
        fig.suptitle(f"{d['run']}: learned KHA matrices minus their init (I; 0 for gates), "
                     "first and last layer")  # fmt: skip
        out.append(_save(fig, results / f"{study}_kha_{d['run']}.png"))

    drifting = [d for d in data if any("kha_drift" in r for r in d["records"])]
    if drifting:  # runs archived before the trainer logged kha_drift have none
        fig, axes = plt.subplots(1, len(drifting), figsize=(max(4.2 * len(drifting), 6.4), 4.0),
                                 dpi=100, squeeze=False, sharey=True)  # fmt: skip
        for a, d in zip(axes[0], drifting):
            rows = [(r["step"], r["kha_drift"]) for r in d["records"]
                    if r.get("type") == "train" and "kha_drift" in r]  # fmt: skip
            steps, per_layer = [s for s, _ in rows], np.array([v for _, v in rows])
            for i in range(per_layer.shape[1]):
                a.plot(steps, per_layer[:, i], lw=1, color=plt.cm.viridis(i / per_layer.shape[1]),
                       label=f"layer {i}")  # fmt: skip
            a.set_title(d["run"], fontsize=9)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
        axes[0][0].set_ylabel("|W - W0| / |I|, layer mean")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{study}: KHA matrices' distance from their init over training", fontsize=10)
        out.append(_save(fig, results / f"{study}_kha_drift.png"))
    return out


def _grad_norm_plot(
    study: str, data: list[dict[str, Any]], variants: list[str], results: Path
) -> Path:
    """The gradient norm of every logged step, the spikes that the defenses act on: each run's
    flagged spikes (x), updates not applied (v), and for a rollback the steps it abandoned
    (dotted) with their spikes, from the step it went back to (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = {v: COLORS[i % len(COLORS)] for i, v in enumerate(variants)}
    fig, axes = plt.subplots(len(data), 1, figsize=(14, 2.6 * len(data)), dpi=100, sharex=True,
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, d in zip(axes[:, 0], data):
        c = color[d["variant"]]
        train = [(r["step"], r["grad_norm"]) for r in d["records"]
                 if r.get("type") == "train" and _positive(r.get("grad_norm"))]  # fmt: skip
        if train:
            ax.plot(*zip(*train), "-", color=c, lw=0.8, label=d["run"])
        for number in sorted({r.get("rolled_back_by", 0) for r in d["rolled_back"]}):
            lost = [(r["step"], r["grad_norm"]) for r in d["rolled_back"]
                    if r.get("type") == "train" and r.get("rolled_back_by", 0) == number
                    and _positive(r.get("grad_norm"))]  # fmt: skip
            if lost:
                ax.plot(*zip(*lost), ":", color=c, lw=0.8)
        for recs in (d["records"], d["rolled_back"]):
            for kind, mark in (("spike", "x"), ("spike_skip", "v")):
                pts = [(r["step"], r["grad_norm"]) for r in recs
                       if r.get("type") == kind and _positive(r.get("grad_norm"))]  # fmt: skip
                if pts:
                    ax.scatter(*zip(*pts), marker=mark, color=c, s=36, zorder=5)
        for r in d["records"]:
            if r.get("type") == "rollback":
                ax.axvspan(r["to_step"], r["from_step"], color=c, alpha=0.15)
        ax.set_yscale("log")
        ax.set_ylabel("grad norm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel(
        "step (line: the mean of each logging interval; markers: the spiking step itself)"
    )
    axes[0, 0].set_title(f"{study}: gradient norm before clipping (x: spike flagged, v: update "
                         "not applied, band and dotted: rolled back)")  # fmt: skip
    return _save(fig, results / f"{study}_grad_norm.png")


def _positive(x: Any) -> bool:
    """A value a log-scale plot can show (records of older runs may lack it, or hold NaN)."""
    return isinstance(x, int | float) and bool(np.isfinite(x)) and x > 0


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
