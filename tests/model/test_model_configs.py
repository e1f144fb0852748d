"""Every YAML under configs/ loads and validates (every run of every study file too); the paper
configs have the paper's sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from script_loader import load_script

from kha_train.config import KHAVariant, load_config
from kha_train.config_checks import validate
from kha_train.model.flops import param_counts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUDIES = sorted(
    p for p in CONFIGS.rglob("*.yaml") if "study" in (yaml.safe_load(p.read_text()) or {})
)
ALL = sorted(set(CONFIGS.rglob("*.yaml")) - set(STUDIES))  # kha-train configs

# (total, active) from the paper: Table 5 and section 4.3 (main run).
PAPER_SIZES = {
    "table5/moe_a0.44b": (2.3e9, 0.44e9),
    "table5/moe_a0.8b": (6.6e9, 0.88e9),  # Table 3 gives 880M active for this model
    "table5/moe_a1.6b": (14.6e9, 1.6e9),
    "table5/dense_0.61b": (0.61e9, 0.61e9),
    "table5/dense_1.68b": (1.68e9, 1.68e9),
    "table5/dense_3.94b": (3.94e9, 3.94e9),
    "main/": (6.1e9, 1.01e9),
}


def test_there_are_paper_configs() -> None:
    paper = [p for p in ALL if "paper" in p.parts]
    assert len(paper) >= 3 + 18 + 18 + 10  # main, table 5, table 1, table 2
    assert (CONFIGS / "paper" / "main" / "kha.yaml") in paper


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    world_sizes = (8, 64) if "paper" in path.parts else (1,)
    for ws in world_sizes:
        validate(cfg, world_size=ws)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_run_of_a_study_file_is_a_valid_config(path: Path) -> None:
    """configs/study/*.yaml (scripts/study.py): each run's config with its keys loads and
    validates, so a typo in a variant fails here, not on the GPU."""
    _, runs, _ = load_script("study").load_study(path)
    assert runs
    for run in runs:
        args = run.train_args(Path("/tmp/unused"))
        if run.overrides.get("train.precision") == "fp8":  # FP8 needs a GPU: checked elsewhere
            args.append("parallel.fp8.emulate=true")
        validate(load_config(args[0], args[1:], notes=[]))


def _paper_size(path: Path) -> tuple[float, float] | None:
    rel = path.relative_to(CONFIGS).as_posix()
    return next((v for k, v in PAPER_SIZES.items() if rel.startswith("paper/" + k)), None)


@pytest.mark.parametrize(
    "path",
    [p for p in ALL if _paper_size(p) and p.name != "base.yaml"],
    ids=lambda p: str(p.relative_to(CONFIGS)),
)
def test_paper_param_counts_within_3_percent(path: Path) -> None:
    cfg = load_config(path)
    expect_total, expect_active = _paper_size(path)
    total, active = param_counts(cfg.model)  # on the meta device
    assert abs(total / expect_total - 1) < 0.03, (
        f"total {total / 1e9:.3f}B vs {expect_total / 1e9}B"
    )
    assert abs(active / expect_active - 1) < 0.03, (
        f"active {active / 1e9:.3f}B vs {expect_active / 1e9}B"
    )


def test_main_runs_differ_only_in_kha() -> None:
    kha = load_config(CONFIGS / "paper" / "main" / "kha.yaml")
    base = load_config(CONFIGS / "paper" / "main" / "baseline.yaml")
    assert kha.model.kha.variant == KHAVariant.mlp and kha.model.kha.targets == ["v"]
    assert base.model.kha.variant == KHAVariant.none
    base.model.kha, base.name, base.logging = kha.model.kha, kha.name, kha.logging
    assert base == kha
    assert kha.train.global_batch_tokens == 512 * 8192 and kha.data.seq_len == 8192
    assert kha.model.moe.num_experts == 128 and kha.model.moe.top_k == 8
    assert kha.optim.lr == 4.78e-4 and kha.train.total_tokens == 10**12
