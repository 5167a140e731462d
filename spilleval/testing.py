"""Small real parts for tests, the demo and the benchmarks: a word-level tokenizer built with `tokenizers`, tiny
config-built models and a synthetic question-answering set. Nothing here downloads anything.
"""

from __future__ import annotations

import random
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
SHAPES = ["cat", "dog", "car", "tree", "house", "bird", "boat", "cup"]
GLUE = ["what", "is", "plus", "the", "colour", "of", "animal", "?", "answer", ":", "question", "a", "picture",
        "shows", "describe", "image", "and", "with", "in", "it", "caption"]
WORDS = NUMBER_WORDS + COLOURS + SHAPES + GLUE


def build_tokenizer(extra_words: list[str] | None = None, *, vocab_size: int | None = None) -> Any:
    """A real `PreTrainedTokenizerFast` over a word-level vocabulary (optionally padded to `vocab_size`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + WORDS + list(extra_words or [])
    if vocab_size is not None:
        words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )


def tiny_llama(vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
               max_positions: int = 2048) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def qa_examples(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """Arithmetic and colour questions with one-word or two-word answers (an open label set)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randrange(10), rng.randrange(9)
            q = f"question : what is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} ?"
            ans = NUMBER_WORDS[a + b]
        else:
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
            q = f"question : a picture shows a {colour} {shape} . what is the colour of the {shape} ?"
            q = q.replace(" . ", " ")
            ans = colour if rng.random() < 0.7 else f"{colour} {shape}"
        out.append({"question": q, "answer": ans})
    return out


def encode_qa(example: dict[str, str], tokenizer: Any, *, index: int | None = None) -> dict[str, Any]:
    """input_ids = <s> question answer : ANSWER </s>; labels supervise only the answer and </s>."""
    prompt = tokenizer(f"<s> {example['question']} answer :", add_special_tokens=False)["input_ids"]
    answer = tokenizer(f"{example['answer']} </s>", add_special_tokens=False)["input_ids"]
    item: dict[str, Any] = {
        "input_ids": prompt + answer,
        "labels": [-100] * len(prompt) + answer,
    }
    if index is not None:
        item["index"] = index
    return item


def pad_batch(items: list[dict[str, Any]], pad_id: int = 0, *, side: str = "right") -> dict[str, torch.Tensor]:
    """Collate token lists into padded tensors (labels padded with -100)."""
    width = max(len(it["input_ids"]) for it in items)

    def pad(seq, value):
        fill = [value] * (width - len(seq))
        return fill + list(seq) if side == "left" else list(seq) + fill

    batch = {
        "input_ids": torch.tensor([pad(it["input_ids"], pad_id) for it in items]),
        "attention_mask": torch.tensor([pad([1] * len(it["input_ids"]), 0) for it in items]),
        "labels": torch.tensor([pad(it["labels"], -100) for it in items]),
    }
    if "index" in items[0]:
        batch["index"] = torch.tensor([it["index"] for it in items])
    return batch
