"""Metrics as people type them on the command line.

- A name may be a metric's name or one of its result keys, with or without the trainer's prefix:
  `perplexity` and `eval_perplexity` are `nll`, `bleu_precision_1` is `bleu`. A typo gets the closest names.
- Parameters go in parentheses: `f1(labels=yes,no,maybe)`, `bleu(references_column=refs, tokenize="intl")`.
  A value is JSON when it parses as JSON (`4`, `true`, `"a,b"`, `["a", "b"]`), a list when it has commas or
  brackets (`a,b,c`, `[a]`), else a string. The parameters are then validated like any spec (`build_metric`).
- A file (`--metrics-file`, JSON or YAML) holds a list of names or `{"name", "params"}` specs, or a mapping of
  name to parameters.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from .base import MetricConfigError, UnknownMetricError
from .registry import available_metrics

RESULT_PREFIX = re.compile(r"^(?:eval|test|predict)_(?:gen_)?")
_PARAM_START = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")  # a comma that starts the next `key=`
_SPEC = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:\((.*)\))?\s*$", re.S)


def result_key_owners() -> dict[str, str]:
    """Every result key of every registered metric (default parameters) -> the metric's name."""
    owners: dict[str, str] = {}
    for name, cls in available_metrics().items():
        for key in cls.result_keys():
            owners.setdefault(key, name)
    return owners


def resolve_name(text: str) -> str:
    """The registered metric that `text` names (its name, a result key, either with an `eval_` prefix)."""
    metrics = available_metrics()
    owners = result_key_owners()
    for candidate in (text, RESULT_PREFIX.sub("", text)):
        if candidate in metrics:
            return candidate
        if candidate in owners:
            return owners[candidate]
    close = difflib.get_close_matches(RESULT_PREFIX.sub("", text), [*metrics, *owners], n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""
    raise UnknownMetricError(
        f"unknown metric {text}.{hint} Known metrics: {', '.join(metrics)} (`spilleval metrics` lists them with "
        "their result keys). A custom metric must be registered with @spilleval.metrics.register before it is "
        "used (for the CLI: --plugin your_module)."
    )


def split_specs(text: str) -> list[str]:
    """`a,f1(labels=x,y),b` -> ["a", "f1(labels=x,y)", "b"]: commas inside parentheses stay."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_spec(text: str) -> str | dict[str, Any]:
    """`nll` -> "nll"; `f1(labels=a,b)` -> {"name": "f1", "params": {"labels": ["a", "b"]}} (names resolved)."""
    match = _SPEC.match(text)
    if match is None:
        raise MetricConfigError(
            f"cannot read the metric {text}: write a name (token_accuracy) or a name with parameters "
            "(f1(labels=yes,no))"
        )
    name, params_text = resolve_name(match.group(1)), match.group(2)
    if params_text is None:
        return name
    return {"name": name, "params": _parse_params(name, params_text)}


def _parse_params(name: str, text: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in _PARAM_START.split(text.strip()) if text.strip() else []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise MetricConfigError(f"metric {name}: cannot read the parameter {item.strip()}: write key=value")
        params[key] = _parse_value(value.strip())
    return params


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        return [_parse_value(v.strip()) for v in text.split(",") if v.strip()]
    if "," in text:
        return [_parse_value(v.strip()) for v in text.split(",")]
    return text


def parse_metrics(text: str | None, file: Path | None = None) -> list[str | dict[str, Any]] | None:
    """The metric specs of `--metrics` and `--metrics-file` (file first), or None when neither is given."""
    if text is None and file is None:
        return None
    specs = read_metrics_file(file) if file is not None else []
    specs += [parse_spec(part) for part in split_specs(text or "")]
    if not specs:
        raise MetricConfigError("no metric named: give --metrics NAME[,NAME...] or a --metrics-file")
    return specs


def read_metrics_file(path: Path) -> list[str | dict[str, Any]]:
    """A JSON or YAML file: a list of names / {"name", "params"} specs, or {name: params} (params may be null)."""
    text = path.read_text(encoding="utf-8")
    data = _load_yaml(path, text) if path.suffix.lower() in (".yaml", ".yml") else _load_json(path, text)
    items = [{"name": k, "params": v or {}} for k, v in data.items()] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MetricConfigError(f"{path}: expected a list of metrics or a mapping of metric name to parameters")
    specs: list[str | dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            specs.append(resolve_name(item))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            specs.append({"name": resolve_name(item["name"]), "params": item.get("params") or {}})
        else:
            raise MetricConfigError(f"{path}: a metric is a name or {{name: ..., params: {{...}}}}, not {item!r:.100}")
    return specs


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise MetricConfigError(f"{path} is not valid JSON ({e}); a .yaml or .yml file is read as YAML") from None


def _load_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise MetricConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MetricConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


def scale_of(key: str) -> str:
    """The scale of a result key ("0–1", "0–100, ...") as its metric declares it; "" when unknown."""
    owners = result_key_owners()
    plain = RESULT_PREFIX.sub("", key)
    owner = owners.get(key) or owners.get(plain)
    return available_metrics()[owner].scale_of(plain if plain in owners else key) if owner else ""


def in_spec_order(results: dict[str, Any], metric_names: list[str]) -> dict[str, Any]:
    """Stored results in the order of the spill's metric specs, each metric's keys in its own order: how
    `compute` lists them, also for a results.json written with sorted keys (before the order was kept)."""
    owners = result_key_owners()
    rank = {name: i for i, name in enumerate(metric_names)}

    def position(item: tuple[str, Any]) -> tuple[int, int]:
        key = RESULT_PREFIX.sub("", item[0])
        owner = owners.get(key) or owners.get(item[0])
        keys = available_metrics()[owner].result_keys() if owner else ()
        return rank.get(owner, len(rank)), keys.index(key) if key in keys else len(keys)

    return dict(sorted(results.items(), key=position))
