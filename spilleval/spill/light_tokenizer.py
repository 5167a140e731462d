"""The spill's tokenizer for showing text, through the `tokenizers` library alone: no transformers, no torch.

`show`, `worst`, `diff` and `report` only decode. Importing transformers to load the tokenizer costs seconds (it
imports torch); for transformers' own fast tokenizer class its decoding is exactly the Rust `Tokenizer.decode`
(`PreTrainedTokenizerFast._decode`, `TokenizersBackend._decode` in transformers 5) unless it cleans up spaces
afterwards. Only that case is served here; any other tokenizer (a subclass, a slow one, clean-up on) is loaded
with transformers as before. `tests/test_light_tokenizer.py` checks both decode the same strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

# transformers' generic fast class (4.x) and its transformers 5 name: neither overrides the Rust decode
PLAIN_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
MAX_CONFIG_BYTES = 4 * 2**20


class LightTokenizer:
    """`decode`, `batch_decode` and `len` of a saved fast tokenizer, as transformers would give them."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

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
    """The tokenizer saved in `path` when it is transformers' plain fast class without space clean-up; else None
    (the caller loads it with transformers). `path` was checked to hold plain files of plausible size."""
    config_path, tokenizer_path = path / "tokenizer_config.json", path / "tokenizer.json"
    if not (config_path.is_file() and tokenizer_path.is_file()) or config_path.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # transformers will say what is wrong with it
    if not isinstance(config, dict) or config.get("tokenizer_class") not in PLAIN_FAST_CLASSES:
        return None
    if config.get("clean_up_tokenization_spaces", False) is not False:
        return None
    try:
        from tokenizers import Tokenizer

        return LightTokenizer(Tokenizer.from_file(str(tokenizer_path)))
    except Exception:  # noqa: BLE001 - the tokenizers library raises bare Exceptions on bad files
        return None
