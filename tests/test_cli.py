"""The `kha-train` command line: every command has --help; config errors are one clean line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kha_train.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "kha_moe.yaml")


def _commands() -> list[list[str]]:
    """Every command path, e.g. ['train'], ['data', 'prepare'], from the real parser."""
    import argparse

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [prefix]
        out = []
        for name, sub in subs[0].choices.items():
            out.extend(walk(sub, [*prefix, name]))
        return out

    return walk(build_parser(), [])


def test_expected_commands_exist() -> None:
    paths = {" ".join(p) for p in _commands()}
    for expected in ("train", "tokenizer train", "data prepare", "info", "bench"):
        assert expected in paths, f"missing command {expected!r} (have {sorted(paths)})"


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p))
def test_help_everywhere(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: kha-train" in capsys.readouterr().out


def test_info_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", TINY, "model.num_layers=6"]) == 0
    out = capsys.readouterr().out
    assert "6 layers" in out and "KHA" in out


def test_config_error_is_one_clean_line() -> None:
    # A real subprocess through the console entry point: exit code 2, no traceback.
    r = subprocess.run(
        [sys.executable, "-m", "kha_train.cli", "info", TINY, "model.hiden_size=64"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "model.hiden_size" in r.stderr and "model.hidden_size" in r.stderr


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p))
def test_help_names_only_files_that_exist(
    path: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([*path, "--help"])
    named = re.findall(r"configs/[\w./-]+\.yaml", capsys.readouterr().out.replace("\n", " "))
    assert all((ROOT / f).is_file() for f in named), f"help names missing files: {named}"


def test_export_of_a_missing_path_says_it_is_missing(tmp_path, capsys) -> None:
    missing = tmp_path / "no_such_step"
    assert main(["export", str(missing), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such checkpoint folder or weights file" in err


def test_flash_attn_missing_is_one_error_line_with_the_fix() -> None:
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    r = subprocess.run(
        [sys.executable, "-m", "kha_train.cli", "train", TINY, "model.attn_backend=flash_attn"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip install 'kha-train[flash]'" in r.stderr and "model.attn_backend=auto" in r.stderr


def test_info_says_which_speed_settings_are_on(capsys: pytest.CaptureFixture[str]) -> None:
    paper = str(ROOT / "configs" / "paper" / "table5" / "moe_a0.44b_kha_mlp.yaml")
    assert main(["info", paper, "--ranks", "1"]) == 0
    out = capsys.readouterr().out
    assert "on 1 GPU(s)    compile on (auto), loss compile on" in out
    assert "on a CPU        compile off (auto)" in out
