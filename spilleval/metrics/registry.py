"""Metrics by name, so users (and `spilleval compute --metrics`) can type the names they know."""

from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from .base import Metric

_REGISTRY: dict[str, type[Metric]] = {}
M = TypeVar("M", bound=type[Metric])


def register(name: str | None = None) -> Callable[[M], M]:
    """Class decorator: make a metric usable by name everywhere (trainer, Evaluator, CLI)."""

    def wrap(cls: M) -> M:
        key = name or cls.name
        if not key:
            raise ValueError(f"{cls.__name__} needs a name (class attribute `name` or register('...'))")
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"metric name {key!r} is already registered by {existing.__module__}.{existing.__name__}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return wrap


def available_metrics() -> dict[str, type[Metric]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def build_metric(spec: str | dict[str, Any] | Metric) -> Metric:
    """A metric from a name, a {"name", "params"} spec (as stored in a manifest), or an instance."""
    if isinstance(spec, Metric):
        return spec
    _load_builtins()
    name, params = (spec, {}) if isinstance(spec, str) else (spec["name"], spec.get("params", {}))
    try:
        cls = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(
            f"unknown metric {name!r}. Known metrics: {known}. A custom metric must be registered with "
            "@spilleval.metrics.register before it is used (for the CLI: --plugin your_module)."
        ) from None
    return cls(**params)


def build_metrics(specs: Iterable[str | dict[str, Any] | Metric]) -> list[Metric]:
    metrics = [build_metric(s) for s in specs]
    names = [m.name for m in metrics]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"metric(s) listed twice: {', '.join(duplicates)}")
    return metrics


def _load_builtins() -> None:
    from . import builtin  # noqa: F401 - registers the built-in metrics on import
