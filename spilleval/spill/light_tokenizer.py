"""The spill's tokenizer for showing text, through the `tokenizers` library alone: no transformers, no torch.

`show`, `worst`, `diff` and `report` only decode. Importing transformers to load the tokenizer costs seconds (it
imports torch); for transformers' own fast tokenizer class its decoding is exactly the Rust `Tokenizer.decode`
(`PreTrainedTokenizerFast._decode`, `TokenizersBackend._decode` in transformers 5) unless it cleans up spaces
afterwards, or its configuration names special tokens that `tokenizer.json` does not mark special: transformers
marks them on load, so `skip_special_tokens=True` drops them, and the Rust tokenizer alone would keep them
("<image> five six" against "five six"). Only the plain case is served here; any other tokenizer (a subclass, a
slow one, clean-up on, special tokens out of step) is loaded with transformers as before. The workers of a parallel
`compute` decode with it too (`SpillReader.require_tokenizer(light=True)`): each then starts without importing
torch. `tests/test_light_tokenizer.py` checks both decode the same strings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import pydantic_core

# transformers' generic fast class (4.x) and its transformers 5 name: neither overrides the Rust decode
PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
MAX_CONFIG_BYTES = 4 * 2**20
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # transformers 4 saves the special tokens here as well
# the configuration's fields that name special tokens (transformers 4 and 5)
SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                        "additional_special_tokens", "extra_special_tokens")


class LightTokenizer:
    """`decode`, `batch_decode` and `len` of a saved fast tokenizer, as transformers would give them. `fingerprint`:
    a digest of the `tokenizer.json` bytes it was built from, so two readers of one tokenizer can share what is
    learnt about it (`decode.batch_decoder`: each token's piece of text)."""

    def __init__(self, backend: Any, fingerprint: bytes | None = None) -> None:
        self.backend = backend
        self.fingerprint = fingerprint

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Sequence[Sequence[int]], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        if clean_up_tokenization_spaces:
            raise ValueError("this tokenizer decodes without clean-up; load it with transformers to clean up spaces")
        return self.backend.decode_batch([list(map(int, r)) for r in rows], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)


def load_light_tokenizer(path: Path) -> LightTokenizer | None:
    """The tokenizer saved in `path` when it is transformers' plain fast class without space clean-up, its special
    tokens marked in `tokenizer.json`; else None (the caller loads it with transformers). `path` was checked to hold
    plain files of plausible size."""
    config_path, tokenizer_path = path / "tokenizer_config.json", path / "tokenizer.json"
    config = _json_object(config_path)
    if config is None or not tokenizer_path.is_file():
        return None  # transformers will say what is wrong with it
    if config.get("tokenizer_class") not in PLAIN_FAST_CLASSES:
        return None
    if config.get("clean_up_tokenization_spaces", False) is not False:
        return None
    try:
        from tokenizers import Tokenizer

        data = tokenizer_path.read_bytes()  # the digest is of the very bytes the tokenizer is built from
        backend = Tokenizer.from_str(data.decode("utf-8"))
    except Exception:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on bad files
        return None
    named = [config, _json_object(path / SPECIAL_TOKENS_MAP) or {}]
    if not _special_tokens_in_step(backend, named, config):
        return None
    return LightTokenizer(backend, hashlib.blake2b(data, digest_size=16).digest())


def _json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:  # a parser of bounded depth: json.loads of arrays nested 100,000 deep raised RecursionError, or, under a
        # raised recursion limit, overflowed the C stack
        value = pydantic_core.from_json(path.read_bytes())
    except ValueError:  # also invalid UTF-8, and nesting deeper than 200
        return None
    return value if isinstance(value, dict) else None


def _special_tokens_in_step(backend: Any, configs: list[dict[str, Any]], config: dict[str, Any]) -> bool:
    """Whether transformers would load `backend` as it is: every special token the configuration names is an added
    token marked special in `tokenizer.json`, and every token of `added_tokens_decoder` is there as declared."""
    added = {token.content: (index, token.special) for index, token in backend.get_added_tokens_decoder().items()}
    for named in configs:
        for field in SPECIAL_TOKEN_FIELDS:
            strings = _token_strings(named.get(field))
            if strings is None or any(not added.get(content, (None, False))[1] for content in strings):
                return False
    declared = config.get("added_tokens_decoder") or {}
    if not isinstance(declared, dict):
        return False
    for index, token in declared.items():
        content = token.get("content") if isinstance(token, dict) else None
        if added.get(content) != (_int_or_none(index), bool(token.get("special"))):
            return False
    return True


def _token_strings(value: Any) -> list[str] | None:
    """The token strings of a special-token field (a string, an AddedToken dict, or a list or dict of those);
    None for a shape not known here, which leaves the tokenizer to transformers."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and "content" in value:
        return [str(value["content"])]
    if not isinstance(value, (list, dict)):
        return None
    strings: list[str] = []
    for item in value.values() if isinstance(value, dict) else value:
        found = _token_strings(item)
        if found is None:
            return None
        strings += found
    return strings


def _int_or_none(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
