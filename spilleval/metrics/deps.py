"""The reference libraries some metrics reuse, imported only by the metric that needs them.

jiwer (wer, cer, mer, wil, wip), rouge-score (rouge) and pycocoevalcap (cider) are optional extras: `import
spilleval` and every other metric work without them. A metric that needs one imports it when it is built, so a
missing library is reported before anything is evaluated, with the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import MetricConfigError

# the extra of pyproject.toml that installs each optional library
EXTRAS = {"jiwer": "asr", "rouge_score": "rouge", "pycocoevalcap": "cider"}
PACKAGES = {"jiwer": "jiwer", "rouge_score": "rouge-score", "pycocoevalcap": "pycocoevalcap", "sacrebleu": "sacrebleu"}


class MissingDependencyError(MetricConfigError, ImportError):
    """A metric's reference library is not installed."""


def require(module: str, metric: str) -> ModuleType:
    """Import `module` (a dotted name) for `metric`, or raise a `MissingDependencyError` saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = PACKAGES.get(top, top)
        extra = EXTRAS.get(top)
        how = f"pip install 'spilleval[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
        # the library (or a module of it) is missing, or else one of the libraries it imports
        absent = error.name is not None and error.name.split(".")[0] == top
        missing = "is not installed" if absent else f"cannot be imported ({error})"
        message = f"metric {metric!r} needs the {package} package, which {missing}: {how}."
        raise MissingDependencyError(message) from error
