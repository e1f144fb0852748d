"""scripts/perf_table.py: ours and the peers' throughput rows in one table, with their settings."""

from __future__ import annotations

import json

from script_loader import load_script


def _module():
    return load_script("perf_table")


def test_rows_of_ours_and_the_peers_with_their_settings(tmp_path, capsys) -> None:
    pt = _module()
    settings = {"micro_batch": 6, "accum": 5, "seq_len": 4096, "ac": "none",
                "loss_kernel": "chunked", "fp8": {"recipe": "tensorwise", "min_dim": 1024}}  # fmt: skip
    ours = tmp_path / "ours_mb6x5.jsonl"
    ours.write_text("".join(json.dumps(r) + "\n" for r in [
        {"variant": "kha", "precision": "bf16", "step_ms": 1217.3, "tokens_per_s": 100940.0,
         "mfu": 0.512, "peak_mem_gib": 65.2, "settings": settings},
        {"variant": "nokha", "precision": "fp8", "step_ms": 1100.0, "tokens_per_s": 111709.1,
         "mfu": 0.566, "peak_mem_gib": 60.0, "settings": settings, "deterministic": True},
        {"variant": "kha", "precision": "bf16", "error": "OutOfMemoryError: CUDA out of memory",
         "settings": settings},
    ]))  # fmt: skip
    main = tmp_path / "main_none_mb1.jsonl"  # a profiled row of the activation-checkpointing sweep
    main.write_text(json.dumps(
        {"variant": "kha", "precision": "bf16", "step_ms": 2000.0, "tokens_per_s": 16384.0,
         "mfu": 0.45, "peak_mem_gib": 130.0, "breakdown_ms": {"attention": 600.0, "moe": 1400.0},
         "settings": {**settings, "micro_batch": 1, "accum": 8, "ac": "every_n", "ac_every_n": 2,
                      "reshard": True, "defer_sync": False, "mode": "single"}}) + "\n")  # fmt: skip
    tt = tmp_path / "tt_amp_mb6x5.log"  # the line ../shared/peers/tt_peer.py prints
    tt.write_text(
        "warming up\nRESULT torchtitan-0.3.0 Qwen3MoE attn=sdpa mode=amp compile=True seq=4096 "
        "mb=6 accum=5 clip=1: 1420.5 ms/step, 86,500 tok/s, 432.1 TFLOP/s, MFU 43.69% "
        "(peak 989e12), peak mem 70.12 GiB alloc / 75.00 GiB reserved\n"
    )
    hf = tmp_path / "hf_mb4x1.log"  # the line ../shared/peers/hf_peer.py prints
    hf.write_text("HF Qwen3Moe attn=sdpa seq=4096 mb=4: 400.0 ms/step, 40,960 tok/s, 200.0 "
                  "TFLOP/s, MFU 20.2% (peak 989), mem 50.5 GiB\n")  # fmt: skip
    broken = tmp_path / "tt_bf16_mb4x1.log"
    broken.write_text("Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory\n")
    assert pt.main([str(ours), str(tt), str(hf), str(broken), str(main)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("| kha-train, KHA-MLP on V | 122,880 (6 x 5 x 4096) | bf16, AC none, loss "
                      "chunked | 1217.3 | 100.9k | 51.2% | 65.2 GiB |")  # fmt: skip
    assert "fp8, AC none, loss chunked, fp8 tensorwise dims >= 1024, deterministic" in out[3]
    assert (
        out[4]
        == "| kha-train, KHA-MLP on V | | failed: OutOfMemoryError: CUDA out of memory | | | | |"
    )
    assert out[5] == ("| torchtitan 0.3.0 | 122,880 (6 x 5 x 4096) | fp32 params + bf16 autocast, "
                      "compile True | 1420.5 | 86.5k | 43.7% | 70.1 GiB |")  # fmt: skip
    assert out[6].startswith(
        "| HF transformers | 16,384 (4 x 1 x 4096) | bf16 params, attention sdpa |"
    )
    assert "failed: torch.OutOfMemoryError: CUDA out of memory" in out[7]
    assert (
        "| 32,768 (1 x 8 x 4096) | bf16, AC every 2, loss chunked, single device (no FSDP2), "
        "reshard_after_forward, "
        "gradient sync every micro-batch | 2000.0 | 16.4k | 45.0% | 130.0 GiB |"
    ) in out[8]
    assert out[10].startswith("Tokens per optimizer step differ between rows")
    # The profiled row's GPU time by part, largest first.
    assert out[14] == "| system | settings | GPU ms / step | moe | attention |"
    assert out[16].startswith("| kha-train, KHA-MLP on V (1 x 8 x 4096) | bf16, AC every 2")
    assert out[16].endswith("| 2000.0 | 1400.0 (70%) | 600.0 (30%) |")


def test_gzipped_archives_and_allocator_retries(tmp_path, capsys) -> None:
    """docs/results/throughput keeps the rows gzipped; a row whose allocator had to flush its
    cache and retry says so (each retry synchronises the device: the step's wall time grows)."""
    import gzip

    pt = _module()
    settings = {"micro_batch": 8, "accum": 1, "seq_len": 4096, "ac": "selective"}
    ours = tmp_path / "ac_sel_mb8.jsonl.gz"
    ours.write_bytes(gzip.compress(json.dumps(
        {"variant": "kha", "precision": "bf16", "step_ms": 906.5, "tokens_per_s": 36149.0,
         "mfu": 0.352, "peak_mem_gib": 125.5, "alloc_retries": 6, "settings": settings}
    ).encode() + b"\n"))  # fmt: skip
    tt = tmp_path / "tt_bf16_mb4x1.log.gz"
    tt.write_bytes(
        gzip.compress(
            b"RESULT torchtitan-0.3.0 Qwen3MoE attn=sdpa mode=bf16 compile=True seq=4096 mb=4 "
            b"accum=1 clip=True: 192.1 ms/step, 85,286 tok/s, 426.5 TFLOP/s, MFU 43.12% "
            b"(peak 989e12), peak mem 55.57 GiB alloc / 60.88 GiB reserved\n"
        )
    )
    assert pt.main([str(ours), str(tt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("| kha-train, KHA-MLP on V | 32,768 (8 x 1 x 4096) | bf16, AC selective, "
                      "loss chunked, 6 allocator retries | 906.5 | 36.1k | 35.2% | 125.5 GiB |")  # fmt: skip
    assert out[3].startswith("| torchtitan 0.3.0 | 16,384 (4 x 1 x 4096) | bf16 params")
