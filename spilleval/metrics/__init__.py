"""Stage 4 of the data path: streaming metrics (mergeable states) and corpus metrics (passes over the spill)."""

from .base import CorpusMetric, Metric, StreamingMetric
from .custom import sample_metric
from .registry import available_metrics, build_metric, build_metrics, register
from .runner import MetricSuite, compute_from_spill

__all__ = [
    "CorpusMetric",
    "Metric",
    "MetricSuite",
    "StreamingMetric",
    "available_metrics",
    "build_metric",
    "build_metrics",
    "compute_from_spill",
    "register",
    "sample_metric",
]
