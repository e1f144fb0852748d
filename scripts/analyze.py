"""What a finished study run learned (used by study.py; also ``python scripts/analyze.py RUN_DIR``).

- Router health on held-out tokens (the first ``TOKENS`` of the val split), per MoE layer: the
  fraction of tokens whose chosen experts differ with and without the loss-free bias, the
  spread (std over experts) of the bias against that of the router scores, and the mean margin
  between the k-th and (k+1)-th score (how far the bias must move to change a choice).
- The learned KHA matrices (T_V for KHA-Linear; W_up, W_gate, W_down for KHA-MLP; W_gate for
  the gate) of every layer, saved to an .npz for the Fig. 3-style heatmaps, with their distance
  from the identity (they start at I; the gate's W at 0): ||W - W_0||_F / ||I||_F.
- MEA runs: ``kha-train virtual-heads`` halves the cached KV heads, and ``kha-train eval`` scores
  the converted model on the same val split (KV cache halved: the loss it costs). Beside it, the
  share of each layer's K and V projection (HLC folded in) that the kept heads hold: the
  squared singular values over the head axis that the rank-r factorisation keeps. A share near
  r / h means the heads are independent and no one-shot factorisation can drop one cheaply.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENS = 65536  # held-out tokens for the router statistics (32 sequences of 2048)


def analyze_run(run_dir: Path, npz_out: Path, device: str = "auto") -> dict[str, Any]:
    from kha_train.config import AttentionKind, load_config
    from kha_train.tools.evaluate import resolve_checkpoint
    from kha_train.tools.weights_io import load_model

    dev = torch.device(
        device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    ckpt = resolve_checkpoint(run_dir)
    cfg = load_config(ckpt / "config.yaml")
    model = load_model(cfg.model, ckpt, dev).eval()
    out: dict[str, Any] = {"checkpoint": ckpt.name}
    out["router"] = router_health(model, cfg, dev)
    out["kha"] = kha_matrices(model, npz_out)
    if AttentionKind(cfg.model.attention) == AttentionKind.mea:
        cached = cfg.model.mea.cached_kv_heads or cfg.model.num_kv_heads
        if cached > 1:
            out["virtual_heads"] = {
                **virtual_heads(run_dir, ckpt, cached // 2, device),
                "kept_energy": kept_energy(model, cached // 2),
            }
    del model
    if dev.type == "cuda":  # study.py analyses in a thread beside the next run's training
        torch.cuda.empty_cache()
    return out


def kept_energy(model: torch.nn.Module, r: int) -> dict[str, list[float]]:
    """Per layer, for K and V: the share that r cached heads keep (virtual_heads.kept_share)."""
    from kha_train.tools.virtual_heads import kept_share

    return {t: [kept_share(layer.attn, t, r) for layer in model.layers] for t in ("k", "v")}


def _val_tokens(cfg: Any, n: int) -> torch.Tensor:
    from kha_train.data.shards import TokenStream, read_index

    stream = TokenStream(read_index(cfg.data.dataset), "val")
    T = cfg.data.seq_len
    rows = max(1, min(n, len(stream)) // T)
    return torch.as_tensor(stream.read(0, rows * T).astype(np.int64)).view(rows, T)


@torch.no_grad()
def router_health(model: torch.nn.Module, cfg: Any, device: torch.device) -> dict[str, Any]:
    from kha_train.model import moe_layers

    layers = moe_layers(model)
    if not layers:
        return {}
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, scores, bias

    def hook(router: Any, _inputs: Any, output: Any) -> None:
        ids, _, scores = output
        seen.append((ids, scores, router.expert_bias.detach().clone()))

    handles = [layer.router.register_forward_hook(hook) for layer in layers]
    try:
        for row in _val_tokens(cfg, TOKENS).split(4):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                model(row.to(device))
    finally:
        for h in handles:
            h.remove()
    per_layer: dict[str, list[float]] = {k: [] for k in
                                         ("flip_fraction", "bias_std", "score_std", "topk_margin")}  # fmt: skip
    n = len(layers)
    for i in range(n):
        chunks = seen[i::n]  # the hooks fire layer by layer for each forward
        ids = torch.cat([c[0] for c in chunks])
        scores = torch.cat([c[1] for c in chunks]).float()
        bias = chunks[0][2].float()
        k = ids.shape[1]
        unbiased = scores.topk(k, dim=-1).indices
        differs = (ids.sort(dim=-1).values != unbiased.sort(dim=-1).values).any(dim=-1)
        top = scores.topk(k + 1, dim=-1).values
        per_layer["flip_fraction"].append(differs.float().mean().item())
        per_layer["bias_std"].append(bias.std().item())
        per_layer["score_std"].append(scores.std(dim=-1).mean().item())
        per_layer["topk_margin"].append((top[:, k - 1] - top[:, k]).mean().item())
    summary = {f"{k}_mean": sum(v) / len(v) for k, v in per_layer.items()}
    return {**summary, "per_layer": per_layer, "tokens": int(ids.shape[0])}


def kha_matrices(model: torch.nn.Module, npz_out: Path) -> dict[str, Any]:
    """Every KHA weight, saved (float32) to ``npz_out``; its distance from its initial value."""
    arrays: dict[str, np.ndarray] = {}
    distance: dict[str, float] = {}
    for name, p in model.named_parameters():
        if ".kha_" not in name:
            continue
        w = p.detach().float().cpu()
        start = torch.zeros_like(w) if name.endswith("w_gate") else torch.eye(w.shape[0])
        arrays[name] = w.numpy()
        distance[name] = ((w - start).norm() / torch.eye(w.shape[0]).norm()).item()
    if arrays:
        npz_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz_out, **arrays)
    return {"distance_from_init": distance}


def virtual_heads(run_dir: Path, ckpt: Path, kv_heads: int, device: str) -> dict[str, Any]:
    weights = run_dir / f"virtual_heads_{kv_heads}.safetensors"
    if not weights.exists():
        subprocess.run([sys.executable, "-m", "kha_train.cli", "virtual-heads", str(ckpt),
                        "--kv-heads", str(kv_heads), "--out", str(weights), "--device", device],
                       check=True, cwd=REPO)  # fmt: skip
    report = run_dir / f"eval_virtual_heads_{kv_heads}.json"
    if not report.exists():
        subprocess.run([sys.executable, "-m", "kha_train.cli", "eval", str(weights), "--config",
                        str(weights.with_suffix(".yaml")), "--json", str(report), "--device",
                        device], check=True, cwd=REPO)  # fmt: skip
    val = next(s for s in json.loads(report.read_text())["sources"] if s["name"] == "val")
    return {"kv_heads": kv_heads, "eval_loss": val["loss"], "eval_bpb": val["bpb"]}


if __name__ == "__main__":
    run = Path(sys.argv[1])
    print(json.dumps(analyze_run(run, run / "kha.npz"), indent=1))
