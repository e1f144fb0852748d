"""The benchmark's step and profile attribution, on CPU (timings themselves need a GPU)."""

from __future__ import annotations

import torch

from kha_train.bench import BenchSettings
from kha_train.bench.profile import breakdown_from_trace
from kha_train.bench.workload import Workload
from kha_train.config import AttnBackend, KHAConfig, ModelConfig, MoEConfig
from kha_train.training import distributed as D


def test_one_benchmark_step_trains_like_the_trainer() -> None:
    """Several micro-batches (deferred gradient sync), clipping, AdamW and the bias update."""
    cfg = ModelConfig(
        vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        ffn_size=64, attn_backend=AttnBackend.math,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16),
        kha=KHAConfig(variant="mlp", targets=["v"]),
    )  # fmt: skip
    try:
        w = Workload(cfg, BenchSettings(seq_len=16, micro_batch=2, accum=3), torch.device("cpu"))
        before = {n: p.full_tensor().clone() for n, p in w.model.named_parameters()}
        loss = w.step().loss
        assert torch.isfinite(loss)
        changed = [
            n for n, p in w.model.named_parameters() if not torch.equal(p.full_tensor(), before[n])
        ]
        assert len(changed) == len(before)  # every parameter was updated
        assert w.model.layers[0].ffn.router.expert_bias.abs().sum() > 0  # the bias moved
    finally:
        D.teardown()


def test_kernels_are_attributed_to_their_launching_scope_or_name() -> None:
    def op(name, ts, dur):
        return {"cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": 1}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}  # fmt: skip

    def kernel(name, corr, dur):
        return {"cat": "kernel", "name": name, "ts": 1000 + corr, "dur": dur,
                "args": {"correlation": corr}}  # fmt: skip

    events = [
        op("Optimizer.step#AdamW.step", 0, 10), launch(1, 1), kernel("multi_tensor_apply", 1, 3000),
        op("lm_head+loss", 20, 10), launch(21, 2), kernel("nvjet_sm90_gemm", 2, 2000),
        launch(40, 3), kernel("cudnn_sdpa_fprop", 3, 4000),
        launch(41, 4), kernel("cutlass_grouped_gemm", 4, 1000),
        launch(42, 5), kernel("triton_poi_fused_add", 5, 500),
    ]  # fmt: skip
    cats, top = breakdown_from_trace(events)
    assert cats == {"optimizer": 3.0, "lm_head+loss": 2.0, "attention": 4.0,
                    "expert_gemm": 1.0, "other": 0.5}  # fmt: skip
    assert top[0] == ("cudnn_sdpa_fprop", 4.0, 1)
