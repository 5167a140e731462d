"""Importing this module registers every built-in metric."""

from . import (  # noqa: F401
    answers,
    asr,
    caption,
    classification,
    coco_caption,
    distributions,
    multiple_choice,
    perplexity,
    rouge,
    scores,
    squad,
    text,
    token,
    translation,
)
