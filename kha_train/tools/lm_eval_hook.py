"""Makes the plain `lm_eval --model kha-train ...` command find our model class.

Released lm-eval (through 0.5.0.dev1) looks ``--model`` up only in its own registry, which
``lm_eval.models`` fills from a fixed list, and runs no outside code first: there is no plugin
discovery. So kha-train installs ``kha_train_lm_eval.pth`` into site-packages (setup.py, for a
regular install; :func:`install_pth` for an editable one, which ``make setup`` calls). Python
runs that one line at start-up: it imports this module, which only adds an import hook (no lm-eval, no torch). When a program later imports ``lm_eval.models``, the
hook lets it fill lm-eval's registry first and then adds ``kha-train`` beside lm-eval's own
models, as a lazy entry naming ``kha_train.tools.lm_eval_model:KhaTrainLM`` (nothing heavy is
imported until someone asks for that model).

The hook never raises into the program (a failure leaves lm-eval as it was) and does nothing
with ``KHA_TRAIN_NO_LM_EVAL_HOOK=1``. With a future lm-eval that reads entry points, the
``lm_eval.models`` entry point in pyproject.toml does the same job and this becomes redundant.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_NAME = "kha-train"
TARGET = "kha_train.tools.lm_eval_model:KhaTrainLM"
PTH_FILE = "kha_train_lm_eval.pth"
# The start-up line: it does nothing when kha_train is gone (an editable install removed).
PTH_LINE = (
    'import importlib.util as _u; _u.find_spec("kha_train") and '
    '__import__("kha_train.tools.lm_eval_hook").tools.lm_eval_hook.install()\n'
)
WATCHED = "lm_eval.models"


def register(registry_module: Any) -> None:
    """Add ``kha-train`` to lm-eval's model registry as a lazy entry (idempotent)."""
    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=TARGET)


class _Loader(importlib.abc.Loader):
    """lm-eval's own loader of ``lm_eval.models``, then the registration."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        try:
            from lm_eval.api import registry

            register(registry)
        except Exception:  # never break lm-eval: without us it works as before
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Add the import hook (what the .pth line calls); a no-op when lm-eval's models are already
    imported (then register at once) or the hook is switched off."""
    if os.environ.get("KHA_TRAIN_NO_LM_EVAL_HOOK") == "1":
        return
    if WATCHED in sys.modules:
        try:
            from lm_eval.api import registry

            register(registry)
        except Exception:
            pass
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install_pth(site_packages: str | None = None) -> Path:
    """Write the start-up line into ``site_packages`` (default: this interpreter's purelib)."""
    import sysconfig

    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_FILE
    path.write_text(PTH_LINE)
    return path
