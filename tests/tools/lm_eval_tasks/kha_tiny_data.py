"""The documents of the kha_tiny_* lm-eval tasks: kha_tiny.jsonl beside this file, read here so
the tasks work from any working directory and never touch the Hugging Face hub or its cache
(the task YAMLs name this as their ``custom_dataset``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("kha_tiny.jsonl")


def load(**_: Any) -> Any:
    """{"test": Dataset} of the JSONL's rows (lm-eval passes the task's metadata: unused)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
