"""Samples → token ids and labels through the model's own chat template, with the loss on
assistant tokens only.

Templates that know tools (they mention `tool_calls`) get OpenAI-form messages and `tools=`.
Plain ChatML templates such as SmolLM2's only concatenate `role` and `content`, so tool
definitions, calls and results are written into the text in the Hermes/Qwen convention
(`trainer.tool_text`). The local backend renders its prompts through `template_inputs` too,
so a model is served the very text it was trained on.

Masking: the chat is rendered once; for every trainable assistant turn the character span
from the end of the rendered prompt (with the generation prompt) to the end of the rendered
turn is the answer, its end-of-turn token included and the trailing newline not. Tokens whose
offsets start inside a span are labelled; all others get -100.
"""

from __future__ import annotations

from typing import Any

from trainer.dataset import Sample
from trainer.tool_text import arguments_value, tool_calls_text, tool_response_text, tools_text

IGNORE_INDEX = -100


class TemplateMismatch(ValueError):
    """The template renders a prefix of a chat differently from the whole chat."""


def template_supports_tools(tokenizer: Any) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "tool_calls" in template


def _inline_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content") or ""
    if message["role"] == "tool":
        # A user turn, as Qwen's template writes it: plain templates may drop unknown roles.
        return {"role": "user", "content": tool_response_text(content)}
    if message.get("tool_calls"):
        content = "\n".join(part for part in (content, tool_calls_text(message["tool_calls"])) if part)
    return {"role": message["role"], "content": content}


def _inline_tools(messages: list[dict[str, Any]], tools: list[Any] | None) -> list[dict[str, Any]]:
    out = [_inline_message(message) for message in messages]
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_text(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out


def _native(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        clean = {k: v for k, v in message.items() if k != "weight"}
        if clean.get("tool_calls"):
            # HF templates expect arguments as an object (they apply `tojson` themselves).
            clean["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": arguments_value(c["function"]["arguments"])}}
                for c in clean["tool_calls"]
            ]
        out.append(clean)
    return out


def to_template_messages(
    messages: list[dict[str, Any]], tools: list[Any] | None, native_tools: bool
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """(messages, tools) to hand to `apply_chat_template` for this template kind. Messages are
    in OpenAI form as `trainer.dataset.normalize_message` leaves them; the output has one
    message per input message, after an added system prompt when tools are inlined."""
    if native_tools:
        return _native(messages), tools or None
    return _inline_tools(messages, tools), None


def template_inputs(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[Any] | None
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """What training and serving both pass to `tokenizer.apply_chat_template` for a chat."""
    return to_template_messages(messages, tools, template_supports_tools(tokenizer))


def render(tokenizer: Any, sample: Sample, upto: int | None = None, generation_prompt: bool = False) -> str:
    """The chat (or its first `upto` messages) as text, through the model's template."""
    converted, tools = template_inputs(tokenizer, sample["messages"], sample.get("tools"))
    if upto is not None:
        # Slice after converting: an inlined tools block must sit in every prefix's system prompt.
        added = len(converted) - len(sample["messages"])
        converted = converted[: added + upto]
    return tokenizer.apply_chat_template(
        converted, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer: Any, sample: Sample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its trainable assistant answers."""
    text = render(tokenizer, sample)
    spans = []
    for index, message in enumerate(sample["messages"]):
        if message["role"] != "assistant" or not message.get("weight", 1):
            continue
        prompt = render(tokenizer, sample, upto=index, generation_prompt=True)
        through = render(tokenizer, sample, upto=index + 1)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise TemplateMismatch("the chat template does not render prefixes consistently")
        start, end = len(prompt), len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return text, spans


def tokenize_sample(tokenizer: Any, sample: Sample, max_length: int) -> dict[str, list[int]] | None:
    """input_ids, attention_mask and labels (-100 outside assistant answers), cut to
    `max_length`; None when nothing trainable is left after the cut."""
    text, spans = assistant_spans(tokenizer, sample)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"][:max_length]
    offsets = encoded["offset_mapping"][: len(ids)]
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, offsets, strict=True)
    ]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
