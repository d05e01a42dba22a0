"""Makes `lm_eval --model layerlab` work: loaded at interpreter start by `layerlab-lm-eval.pth`.

lm-evaluation-harness 0.4.13 does not discover plugins, so this tiny module (it imports nothing
heavy) waits for lm-eval to fill its model registry and then adds `layerlab` as a lazy entry; the
adapter itself (`layerlab.evaluate.lm_eval_adapter`) is imported only when that model is asked for.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "layerlab.evaluate.lm_eval_adapter:LayerlabLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "layerlab" not in model_registry:
        model_registry.register("layerlab", target=TARGET)
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _one_line_for_user_errors


def _one_line_for_user_errors(kind, value, traceback) -> None:
    """In lm-eval's own command line, a layerlab user error (a bad plan or model) is one line, exit 2."""
    from layerlab.errors import LayerlabError, one_line

    if not isinstance(value, LayerlabError):
        sys.__excepthook__(kind, value, traceback)
        return
    sys.stderr.write(f"error: {one_line(value)}\n")
    sys.stderr.flush()
    import os

    os._exit(2)  # sys.exit cannot be raised from an excepthook; lm-eval has nothing left to clean up


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    """Runs `register()` right after the module `lm_eval.models` executes."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                register()

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())
