"""spilleval: exact, memory-bounded evaluation of (multimodal) language models trained with transformers.

capture -> reduce -> spill -> metrics -> report: each stage is a module of its own.
"""

__version__ = "0.1.0"

from .batch import SampleBatch
from .distributed import DistributedEvaluationError
from .evaluator import Evaluator
from .generation import GenerationEval
from .metrics import CorpusMetric, StreamingMetric, compute_from_spill, register
from .reduce import ReducedBatch, reduce_logits
from .spill import SpillReader, SpillWriter

__all__ = [
    "CorpusMetric",
    "DistributedEvaluationError",
    "Evaluator",
    "GenerationEval",
    "ReducedBatch",
    "SampleBatch",
    "SpillReader",
    "SpillWriter",
    "StreamingMetric",
    "__version__",
    "compute_from_spill",
    "reduce_logits",
    "register",
]


def __getattr__(name: str):
    if name == "SpillingTrainer":  # imports transformers.Trainer lazily
        from .trainer import SpillingTrainer

        return SpillingTrainer
    raise AttributeError(name)
