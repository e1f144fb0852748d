"""Only for the one file pyproject.toml cannot place: kha_train_lm_eval.pth at the top of
site-packages, which lets the plain `lm_eval --model kha-train` command find kha-train's model
class (kha_train/tools/lm_eval_hook.py says why and how). Everything else is in pyproject.toml.
An editable install (`pip install -e`) does not get it this way: `make setup` calls
kha_train.tools.lm_eval_hook.install_pth() instead."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "kha_train_lm_eval.pth"
LINE = (
    'import importlib.util as _u; _u.find_spec("kha_train") and '
    '__import__("kha_train.tools.lm_eval_hook").tools.lm_eval_hook.install()\n'
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        with open(os.path.join(self.build_lib, PTH), "w") as f:
            f.write(LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
