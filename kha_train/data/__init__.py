"""Data: tokenizer, dataset preparation and the resumable packed loader (docs/data.md).

``PackedLoader`` and ``Batch`` are imported on first use, so importing this package (as the CLI
does to register its commands) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kha_train.data.loader import Batch, PackedLoader

__all__ = ["Batch", "PackedLoader"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kha_train.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
