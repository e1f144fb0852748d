"""The config system: YAML + extends + overrides, typed errors, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from kha_train.config import (
    Balancing,
    ConfigError,
    KHAVariant,
    load_config,
    save_config,
)
from kha_train.config_checks import total_steps, validate

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "kha_moe.yaml"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tiny_config_loads_with_extends_and_overrides() -> None:
    cfg = load_config(TINY, ["optim.lr=1e-4", "train.max_steps=7", "model.kha.targets=[q,v]"])
    assert cfg.model.kha.variant == KHAVariant.mlp  # from kha_moe.yaml
    assert cfg.model.moe.num_experts == 8  # inherited from base.yaml
    assert cfg.optim.lr == 1e-4 and cfg.train.max_steps == 7
    assert cfg.model.kha.targets == ["q", "v"]
    assert cfg.logging.run_dir == "runs/tiny-kha-moe"  # interpolation of ${name}
    validate(cfg)


def test_an_empty_mapping_clears_eval_sets_where_a_merge_adds(tmp_path: Path) -> None:
    """eval.sets is free-form: later layers add names to it, and {} turns it off (documented)."""
    base = write(tmp_path, "base.yaml", f"extends: {TINY}\neval:\n  sets: {{a: data/a}}\n")
    assert load_config(base).eval.sets == {"a": "data/a"}
    assert load_config(base, ["eval.sets.b=data/b"]).eval.sets == {"a": "data/a", "b": "data/b"}
    assert load_config(base, ["eval.sets={}"]).eval.sets == {}
    child = write(tmp_path, "child.yaml", "extends: base.yaml\neval:\n  sets: {}\n  every: 5\n")
    cfg = load_config(child)
    assert cfg.eval.sets == {} and cfg.eval.every == 5


def test_unknown_key_names_full_path_and_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "x.yaml", f"extends: {TINY}\nmodel:\n  moe:\n    num_expert: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.moe.num_expert" in msg and "model.moe.num_experts" in msg
    assert str(p) in msg


def test_unknown_override_suggests() -> None:
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*'optim\.lr'"):
        load_config(TINY, ["optim.lrr=1e-3"])


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden_size"):
        load_config(TINY, ["model.hidden_size=big"])
    with pytest.raises(ConfigError, match=r"model\.moe\.balancing.*loss_free_rms"):
        load_config(TINY, ["model.moe.balancing=loss_free"])


def test_section_given_a_scalar(tmp_path: Path) -> None:
    p = write(tmp_path, "x.yaml", "model: 3\n")
    with pytest.raises(ConfigError, match=r"'model' is a section"):
        load_config(p)


def test_missing_required_value(tmp_path: Path) -> None:
    p = write(tmp_path, "x.yaml", "train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"missing: data\.dataset"):
        load_config(p)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TINY, ["optim.lr"])


def test_extends_loop_and_missing_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("overrides", "world_size", "needle"),
    [
        (["model.num_kv_heads=3"], 1, "num_kv_heads=3 must divide"),
        (["model.moe.top_k=9"], 1, "top_k=9 must be in [1, model.moe.num_experts=8]"),
        (
            ["train.global_batch_tokens=1000"],
            1,
            "global_batch_tokens=1000 must be a positive multiple",
        ),
        ([], 3, "x 3 ="),  # 8192 tokens do not split over 3 ranks of 16 x 256
        (["model.kha.variant=gate", "model.kha.targets=[q]"], 1, "value-only ablation"),
        (["model.kha.targets=[x]"], 1, "subset of ['q', 'k', 'v']"),
        (["train.total_tokens=100000", "train.max_steps=3"], 1, "exactly one of train.max_steps"),
        (["optim.lr=1e38"], 1, "optim.lr=1e+38 must be in (0, 1.0]"),
        (["optim.lr=nan"], 1, "optim.lr=nan must be in"),
        (["optim.lr=-1e-3"], 1, "optim.lr=-0.001 must be in"),
        (["optim.eps=0"], 1, "optim.eps=0.0 must be in (0, 1)"),
        (["optim.eps=inf"], 1, "optim.eps=inf must be in (0, 1)"),
        (["optim.beta1=1.0"], 1, "optim.beta1 must be in [0, 1)"),
        (["optim.beta2=0"], 1, "optim.beta2 in (0, 1)"),
        (["optim.grad_clip=inf"], 1, "optim.grad_clip must be >= 0 and finite"),
        (["train.val_batches=0", "train.val_every=10"], 1, "validation needs at least one"),
        (["train.val_batches=-1"], 1, "train.val_batches=-1"),
        (["train.max_nonfinite_in_row=0"], 1, "train.max_nonfinite_in_row must be >= 1"),
        (["data.prefetch=-1"], 1, "data.prefetch must be >= 0"),
        (["model.norm_eps=2.0"], 1, "model.norm_eps=2.0 must be in (0, 1)"),
        (["model.rope_theta=inf"], 1, "model.rope_theta must be a positive finite"),
        (["model.moe.bias_update_rate=nan"], 1, "model.moe.bias_update_rate must be >= 0"),
        (["logging.peak_tflops=0"], 1, "logging.peak_tflops must be a positive"),
        (["schedule.warmup_steps=-2"], 1, "schedule.warmup_steps must be >= 0"),
        (["model.moe.first_k_dense=4"], 1, "no layer is MoE"),
        (["parallel.dp_replicate=2", "parallel.dp_shard=2"], 2, "must equal the number of ranks 2"),
    ],
)
def test_cross_field_checks(overrides: list[str], world_size: int, needle: str) -> None:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=world_size)
    assert needle in str(e.value)


def test_all_errors_reported_at_once() -> None:
    cfg = load_config(TINY, ["model.num_kv_heads=3", "optim.beta2=1.5"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "num_kv_heads" in str(e.value) and "beta2" in str(e.value)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["model.moe.balancing=loss_free_sign", "train.max_steps=11"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.model.moe.balancing == Balancing.loss_free_sign
    assert total_steps(again) == 11


def test_validation_off_is_accepted() -> None:
    validate(load_config(TINY, ["train.val_batches=0", "train.val_every=0"]))


@pytest.mark.parametrize(
    ("overrides", "max_steps", "total_tokens"),
    [
        (["train.total_tokens=81920"], None, 81920),  # the tiny config sets max_steps
        (["train.max_steps=7"], 7, None),
        (["train.max_steps=null", "train.total_tokens=81920"], None, 81920),
    ],
)
def test_overriding_one_exclusive_key_replaces_the_other(
    overrides: list[str], max_steps: int | None, total_tokens: int | None
) -> None:
    notes: list[str] = []
    cfg = load_config(TINY, overrides, notes=notes)
    validate(cfg)
    assert (cfg.train.max_steps, cfg.train.total_tokens) == (max_steps, total_tokens)
    if overrides == ["train.total_tokens=81920"]:
        assert notes == ["train.total_tokens=81920 (command line) replaces train.max_steps=150"]
    else:
        assert notes == []


def test_exclusive_key_of_a_paper_config_is_replaced_with_a_note(capsys) -> None:
    paper = TINY.parents[1] / "paper" / "table5" / "moe_a0.44b_kha_mlp.yaml"
    cfg = load_config(paper, ["train.max_steps=20"])
    assert (cfg.train.max_steps, cfg.train.total_tokens) == (20, None)
    assert "note: train.max_steps=20 (command line) replaces train.total_tokens=" in (
        capsys.readouterr().err
    )


def test_total_steps_from_tokens() -> None:
    cfg = load_config(TINY, ["train.max_steps=null", "train.total_tokens=81920"])
    validate(cfg)
    assert total_steps(cfg) == 10
