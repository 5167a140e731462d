"""spilleval: exact, memory-bounded evaluation of (multimodal) language models trained with transformers.

capture -> reduce -> spill -> metrics -> report: each stage is a module of its own.

The names below are imported on first use, so `spilleval compute/inspect/show` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IncompleteEvaluationError": ".accounting",
    "SampleBatch": ".batch",
    "LabelCaptureError": ".capture",
    "ComputeMetricsError": ".compat",
    "DistributedEvaluationError": ".distributed",
    "Evaluator": ".evaluator",
    "GenerationEval": ".generation",
    "CorpusMetric": ".metrics",
    "StreamingMetric": ".metrics",
    "compute_from_spill": ".metrics",
    "register": ".metrics",
    "ReducedBatch": ".reduce",
    "reduce_logits": ".reduce",
    "SpillReader": ".spill",
    "SpillWriter": ".spill",
    "SpillingTrainer": ".trainer",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spilleval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
