"""Importing this module registers every built-in metric."""

from . import answers, text, token  # noqa: F401
