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


def train_qa(model: Any, tokenizer: Any, *, steps: int = 60, batch_size: int = 16, lr: float = 1e-2,
             examples: int = 512, seed: int = 0) -> Any:
    """Teach a tiny causal LM the synthetic QA task a little (a plain torch loop), so that its predictions are a
    mix of right and wrong answers rather than all wrong. Returns the model in eval mode."""
    train = [encode_qa(ex, tokenizer) for ex in qa_examples(examples, seed=seed + 10_000)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        picks = torch.randint(0, len(train), (batch_size,), generator=generator).tolist()
        batch = pad_batch([train[i] for i in picks], tokenizer.pad_token_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def fit(model: torch.nn.Module, batches: list[dict[str, Any]], steps: int = 40) -> torch.nn.Module:
    """A few optimizer steps over ready-made batches, so that predictions are often right (metrics far from 0 and
    1). Returns the model in eval mode."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# =============================================================================================================
# A LLaVA-style multimodal model (tests, demo, benchmarks).
#
# As in LLaVA, a mixin's `prepare_inputs_labels_for_multimodal` replaces each sample's <image> placeholder by a
# per-sample number of projected image features, labels those positions -100, re-pads the batch (right or left)
# and hands `inputs_embeds` and the new labels to `LlamaForCausalLM.forward` through `super()`. The model forces
# `output_hidden_states=True`, like the model of the motivating example. The batch's raw labels therefore do not
# line up with the logits: exactly the case `spilleval.capture` exists for.
# =============================================================================================================
IMAGE_TOKEN = "<image>"


class LlavaStyleMixin:
    """Multimodal input preparation over any causal LM that has `get_input_embeddings` and an `mm_projector`."""

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | None,
        num_image_features: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> tuple[None, torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor | None]:
        """(input_ids=None, position_ids, attention_mask, past_key_values, inputs_embeds, labels) after expansion,
        re-padded on `padding_side` (default: the config's `mm_padding_side`)."""
        config = self.config  # type: ignore[attr-defined]
        embed = self.get_input_embeddings()  # type: ignore[attr-defined]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        projector = self.mm_projector  # type: ignore[attr-defined]
        features = projector(images.to(projector[0].weight.dtype)) if images is not None else None
        rows, row_labels = [], []
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()
            ids = input_ids[i][keep]
            lab = labels[i][keep] if labels is not None else torch.full_like(ids, -100)
            emb = embed(ids)
            where = (ids == config.image_token_id).nonzero().flatten()
            if len(where) and features is not None:
                p = int(where[0])
                k = int(num_image_features[i]) if num_image_features is not None else features.shape[1]
                emb = torch.cat([emb[:p], features[i, :k].to(emb.dtype), emb[p + 1 :]])
                lab = torch.cat([lab[:p], lab.new_full((k,), -100), lab[p + 1 :]])
            rows.append(emb)
            row_labels.append(lab)
        side = padding_side or config.mm_padding_side
        embeds, new_labels, new_mask, new_positions = _repad(rows, row_labels, side=side)
        return None, new_positions, new_mask, past_key_values, embeds, new_labels if labels is not None else None


def _repad(rows: list[torch.Tensor], labels: list[torch.Tensor], *, side: str):
    width = max(len(r) for r in rows)
    batch, hidden = len(rows), rows[0].shape[-1]
    embeds = rows[0].new_zeros((batch, width, hidden))
    new_labels = labels[0].new_full((batch, width), -100)
    mask = torch.zeros((batch, width), dtype=torch.long, device=rows[0].device)
    positions = torch.zeros((batch, width), dtype=torch.long, device=rows[0].device)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        n = len(row)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        embeds[i, span], new_labels[i, span], mask[i, span] = row, lab, 1
        positions[i, span] = torch.arange(n, device=row.device)
    return embeds, new_labels, mask, positions


def _llava_class() -> type:
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class TinyLlavaForCausalLM(LlavaStyleMixin, LlamaForCausalLM):
        """LlamaForCausalLM + a two-layer vision projector over synthetic image features (LLaVA's mlp2x_gelu)."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.mm_projector = torch.nn.Sequential(
                torch.nn.Linear(config.mm_feature_dim, config.hidden_size),
                torch.nn.GELU(),
                torch.nn.Linear(config.hidden_size, config.hidden_size),
            )
            self.post_init()

        def forward(
            self,
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            inputs_embeds: torch.Tensor | None = None,
            labels: torch.Tensor | None = None,
            images: torch.Tensor | None = None,
            num_image_features: torch.Tensor | None = None,
            use_cache: bool | None = None,
            output_attentions: bool | None = None,
            output_hidden_states: bool | None = True,
            return_dict: bool | None = None,
            **kwargs: Any,
        ) -> CausalLMOutputWithPast:
            if inputs_embeds is None and not _decoding_from_cache(kwargs):
                (input_ids, position_ids, attention_mask, _, inputs_embeds, labels) = (
                    self.prepare_inputs_labels_for_multimodal(
                        input_ids, position_ids, attention_mask, None, labels, images, num_image_features
                    )
                )
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                output_attentions=False,
                output_hidden_states=True,  # forced, as in the motivating example
                return_dict=True,
                **kwargs,
            )

        @torch.no_grad()
        def generate(
            self,
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            images: torch.Tensor | None = None,
            num_image_features: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> Any:
            """As LLaVA does: embed the prompts with their image features, re-padded on the left as generation
            needs, and generate from `inputs_embeds`. The output holds the new tokens only."""
            if input_ids is None:
                return super().generate(attention_mask=attention_mask, **kwargs)
            _, _, mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
                input_ids, None, attention_mask, None, None, images, num_image_features, padding_side="left"
            )
            return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    return TinyLlavaForCausalLM


def _decoding_from_cache(forward_kwargs: dict[str, Any]) -> bool:
    """A generation step after the first: the prompt (and its image features) is already in the cache."""
    cache = forward_kwargs.get("cache", forward_kwargs.get("past_key_values"))  # transformers >= 5 / before
    return cache is not None and cache.get_seq_length() > 0


def tiny_llava(vocab_size: int, *, image_token_id: int, padding_side: str = "right", feature_dim: int = 8,
               hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Any:
    """A config-built LLaVA-style model; `padding_side` is how the batch is re-padded after expansion."""
    from transformers import LlamaConfig

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    config.image_token_id = image_token_id
    config.mm_feature_dim = feature_dim
    config.mm_padding_side = padding_side
    return _llava_class()(config)


def encode_multimodal_qa(example: dict[str, str], tokenizer: Any, *, num_features: int, feature_dim: int = 8,
                         seed: int = 0) -> dict[str, Any]:
    """`<s> <image> question answer : ANSWER </s>` plus `num_features` synthetic image features."""
    item = encode_qa({"question": f"{IMAGE_TOKEN} {example['question']}", "answer": example["answer"]}, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    item["images"] = torch.randn(num_features, feature_dim, generator=generator)
    return item


def multimodal_qa_dataset(n: int, tokenizer: Any, *, feature_dim: int = 8, max_features: int = 6,
                          seed: int = 0) -> list[dict[str, Any]]:
    """Questions with an image of 1..max_features feature positions each (varies per sample)."""
    rng = random.Random(seed)
    return [
        encode_multimodal_qa(ex, tokenizer, num_features=rng.randint(1, max_features), feature_dim=feature_dim,
                             seed=seed * 100_003 + i)
        for i, ex in enumerate(qa_examples(n, seed=seed))
    ]


def pad_multimodal_batch(items: list[dict[str, Any]], pad_id: int = 0, *, side: str = "right") -> dict[str, Any]:
    """`pad_batch` plus `images [B, max_features, F]` (zero-padded) and `num_image_features [B]`."""
    batch = pad_batch([{k: v for k, v in it.items() if k != "images"} for it in items], pad_id, side=side)
    counts = [len(it["images"]) for it in items]
    images = torch.zeros(len(items), max(counts), items[0]["images"].shape[-1])
    for i, it in enumerate(items):
        images[i, : counts[i]] = it["images"]
    batch["images"] = images
    batch["num_image_features"] = torch.tensor(counts)
    return batch


# ----------------------------------------------------------------------------------------------- memory
# Peak RSS is read from the kernel's high-water mark (VmHWM), which a process can restart from its current RSS.
# Not `resource.getrusage().ru_maxrss`: Linux carries that across fork + exec, so a child started by a large
# pytest worker would report the parent's peak and the growth would read 0.


def reset_peak_rss(pid: int | str = "self") -> int:
    """Restart the high-water mark of a process (this one by default) from its current RSS (Linux
    /proc/PID/clear_refs); return the RSS in bytes."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS", pid)


def peak_rss(pid: int | str = "self") -> int:
    """A process's (this one's by default) peak RSS in bytes since it started or since the last
    `reset_peak_rss()`."""
    return _proc_status_bytes("VmHWM", pid)


def _proc_status_bytes(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024
