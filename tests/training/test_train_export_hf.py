"""checkpoint.export_hf (training/hf_export.py): every checkpoint also written as a Hugging Face
model in the background, loadable by transformers with the checkpoint's logits; the newest
keep_last kept; a failed export is a warning, not the end of the run."""

from __future__ import annotations

import json

import torch
from train_helpers import build, records, tiny_config, train_here

from kha_train.training.hf_export import HFExporter


def test_every_checkpoint_is_exported_and_loads(tmp_path, tiny_dataset) -> None:
    from transformers import AutoModelForCausalLM

    from kha_train.tools.weights_io import load_model

    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, checkpoint={"export_hf": True, "keep_last": 1})
    train_here(cfg)
    exports = records(run, "export")
    assert [r["step"] for r in exports] == [3, 6]  # checkpoints at 3 and 6
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["export.log", "step_0000006"]
    hf_dir = run / "hf" / "step_0000006"
    # KHA-MLP has no stock class: the remote-code class, with the checkpoint's weights.
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["KhaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    ours = load_model(build(cfg).model, run / "checkpoints" / "step_0000006", "cpu")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids)
        got = hf(ids).logits
    # The export is bf16 (its default): logits agree to bf16 rounding of the weights.
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_a_failed_export_is_a_warning(tmp_path) -> None:
    reports: list[tuple[str, dict]] = []
    exporter = HFExporter(tmp_path / "run", keep_last=2, report=lambda *r: reports.append(r))
    not_a_checkpoint = tmp_path / "step_0000004"
    not_a_checkpoint.mkdir()
    exporter.start(4, not_a_checkpoint)
    exporter.wait()
    [(line, record)] = reports
    assert record["type"] == "export_failed" and record["step"] == 4 and record["exit_code"] != 0
    assert "export of step 4 failed" in line and "kha-train export" in line
    assert not any(p.name.startswith("step_") for p in (tmp_path / "run" / "hf").iterdir())
