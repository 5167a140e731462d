"""Metrics by name, so users (and `spilleval compute --metrics`) can type the names they know."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable, TypeVar

from pydantic import ConfigDict, ValidationError, validate_call

from .base import Metric, MetricConfigError, UnknownMetricError

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


def registered_in_main() -> bool:
    """Whether a class of the main module (a user's script) is registered: processes that rebuild metrics by name
    must import that module to find it (`pool.without_main`)."""
    return any(cls.__module__ == "__main__" for cls in _REGISTRY.values())


def registering_modules(metrics: Iterable[Metric]) -> tuple[str, ...]:
    """The modules that register these metrics' classes, for a worker to import before it rebuilds them by name
    (`import_modules`). The main module is not one: a pool's workers import it themselves when a metric is
    registered there (`registered_in_main`)."""
    return tuple(sorted({type(m).__module__ for m in metrics} - {"__main__", "__mp_main__"}))


def import_modules(modules: Iterable[str]) -> None:
    """In a worker: import the modules that register custom metrics (`registering_modules`)."""
    for module in modules:
        importlib.import_module(module)


def available_metrics() -> dict[str, type[Metric]]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def build_metric(spec: str | dict[str, Any] | Metric) -> Metric:
    """A metric from a name, a {"name", "params"} spec (as stored in a manifest), or an instance."""
    if isinstance(spec, Metric):
        return spec
    _load_builtins()
    if isinstance(spec, dict) and not (isinstance(spec.get("name"), str) and isinstance(spec.get("params", {}), dict)):
        raise MetricConfigError(f"a metric is given by its name or {{'name': str, 'params': dict}}, not {spec!r:.200}")
    name, params = (spec, {}) if isinstance(spec, str) else (spec["name"], spec.get("params", {}))
    cls = _REGISTRY.get(name)
    if cls is None:
        from .names import resolve_name

        resolve_name(name)  # raises UnknownMetricError with the closest names, unless `name` is a result key
        raise UnknownMetricError(f"unknown metric {name}: it is a result key of metric {resolve_name(name)}; "
                                 f"name that metric instead")
    return _construct(cls, name, params)


def _construct(cls: type[Metric], name: str, params: dict[str, Any]) -> Metric:
    """`cls(**params)`, the parameters first validated against the constructor's type hints (pydantic, strict):
    they may come from a spill's manifest, so a wrong type or an out-of-range size is an error naming the metric
    and the parameter, before the metric allocates or computes anything."""
    init = _validated_init(cls)
    try:
        if init is None:
            metric = cls(**params)
        else:
            metric = cls.__new__(cls)
            init(metric, **params)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise MetricConfigError(
            f"metric {name}: parameter {where or '?'} is invalid: {first['msg']} (got {first['input']!r:.80})"
        ) from None
    except MetricConfigError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError) as e:
        raise MetricConfigError(f"metric {name} cannot be built from the parameters {params!r:.200}: {e}") from e
    return metric


@functools.cache
def _validated_init(cls: type[Metric]) -> Callable[..., None] | None:
    """The constructor wrapped by pydantic's `validate_call`; None when it is not Python code (nothing typed)."""
    if not inspect.isfunction(cls.__init__):
        return None
    return validate_call(cls.__init__, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def build_metrics(specs: Iterable[str | dict[str, Any] | Metric]) -> list[Metric]:
    metrics = [build_metric(s) for s in specs]
    names = [m.name for m in metrics]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"metric(s) listed twice: {', '.join(duplicates)}")
    return metrics


def _load_builtins() -> None:
    from . import builtin  # noqa: F401 - registers the built-in metrics on import
