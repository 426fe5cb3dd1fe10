"""From logged request/response records (or a chat JSONL) to training samples.

A sample is one chat in OpenAI's fine-tuning JSONL shape: `{"messages": [...]}` plus, when the
request had them, its `"tools"`, `"tool_choice"`, `"response_format"` and
`"parallel_tool_calls"` (train.jsonl and heldout.jsonl lines carry them, so the held-out eval
can replay the request). Messages keep system prompts, tool calls and tool results in OpenAI
form; earlier assistant turns of a logged conversation carry `"weight": 0` because the record
only vouches for the final answer (history may come from anyone, even the local model).

The held-out split is decided per sample by a hash of its prompt, so it is deterministic,
never mixes one prompt into both sides, and a sample keeps its side as the data grows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

Sample = dict[str, Any]
Record = dict[str, Any]

CHAT_ENDPOINT_SUFFIX = "/chat/completions"
MIN_SAMPLES_FOR_HELDOUT = 5
# Marks a sample the gateway generated (gateway.adaptive.synthetic): never held out.
SYNTHETIC_KEY = "synthetic"
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_UNUSABLE_FINISH = {"length": "truncated", "content_filter": "content_filter"}
# Request fields a sample keeps (besides tools) so the held-out eval replays the request as
# it was asked: tool use and JSON mode change what a right answer is.
REPLAYED_FIELDS = ("tool_choice", "response_format", "parallel_tool_calls")


class SkipSample(Exception):
    """A record or chat that cannot become a training sample; `reason` is a short counter key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Conversion:
    """Usable samples in input order, duplicates removed, and why the rest were skipped."""

    samples: list[Sample] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


# --- messages -----------------------------------------------------------------------------


def _text_content(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SkipSample("malformed")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PART_TYPES:
            raise SkipSample("non_text_content")
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)


def _normalize_tool_call(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not function.get("name"):
        raise SkipSample("malformed")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": call.get("id") or "",
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def normalize_message(message: Any) -> dict[str, Any]:
    """One message reduced to the fields a chat template uses, in OpenAI form."""
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise SkipSample("malformed")
    role = "system" if message["role"] == "developer" else message["role"]
    out: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"))}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [_normalize_tool_call(call) for call in message["tool_calls"]]
    if role == "tool":
        out["tool_call_id"] = message.get("tool_call_id") or ""
    if message.get("name"):
        out["name"] = message["name"]
    if role == "assistant" and "weight" in message:
        out["weight"] = 0 if not message["weight"] else 1
    if out["content"] is None and "tool_calls" not in out:
        out["content"] = ""
    return out


def _has_answer(message: dict[str, Any]) -> bool:
    return bool(message.get("content") or message.get("tool_calls"))


def normalize_sample(chat: Any) -> Sample:
    """Validate a `{"messages": [...], "tools"?: [...]}` chat; it needs a trainable answer."""
    if not isinstance(chat, dict) or not isinstance(chat.get("messages"), list):
        raise SkipSample("malformed")
    messages = [normalize_message(message) for message in chat["messages"]]
    trainable = [m for m in messages if m["role"] == "assistant" and m.get("weight", 1) and _has_answer(m)]
    if not trainable:
        raise SkipSample("empty_answer")
    sample: Sample = {"messages": messages}
    tools = chat.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise SkipSample("malformed")
        sample["tools"] = tools
    for key in REPLAYED_FIELDS:
        if chat.get(key) is not None:
            sample[key] = chat[key]
    return sample


# --- log records --------------------------------------------------------------------------


def _check_usable(record: Record) -> dict[str, Any]:
    """Raise SkipSample unless the record is a successful, complete cloud chat answer;
    return its first choice."""
    if record.get("backend") != "cloud":
        raise SkipSample("not_cloud")
    if record.get("status") != 200:
        raise SkipSample("status")
    if record.get("outcome", "ok") != "ok":
        raise SkipSample("outcome")
    request, response = record.get("request"), record.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise SkipSample("malformed")
    endpoint = record.get("endpoint")
    is_chat = (
        endpoint.endswith(CHAT_ENDPOINT_SUFFIX) if endpoint else response.get("object") == "chat.completion"
    )
    if not is_chat:
        raise SkipSample("endpoint")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise SkipSample("malformed")
    finish = choices[0].get("finish_reason")
    if finish in _UNUSABLE_FINISH:
        raise SkipSample(_UNUSABLE_FINISH[finish])
    return choices[0]


def record_to_sample(record: Record) -> Sample:
    """A usable log record as a sample; raises SkipSample with the reason otherwise."""
    choice = _check_usable(record)
    request = record["request"]
    history = request.get("messages")
    if not isinstance(history, list) or not history:
        raise SkipSample("malformed")
    prompt = [normalize_message(message) for message in history]
    for message in prompt:
        if message["role"] == "assistant":
            message["weight"] = 0
    answer = normalize_message({**choice.get("message", {}), "role": "assistant"})
    answer.pop("weight", None)
    if not _has_answer(answer):
        raise SkipSample("empty_answer")
    asked = {key: request.get(key) for key in ("tools", *REPLAYED_FIELDS)}
    sample = normalize_sample({"messages": [*prompt, answer], **asked})
    if record.get("kind") == "synthetic":
        sample[SYNTHETIC_KEY] = True
    return sample


def split_synthetic(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(real, synthetic): synthetic pairs may be trained on but never held out, and leave
    their marker behind (it is not a chat field)."""
    real = [s for s in samples if not s.get(SYNTHETIC_KEY)]
    synthetic = [{k: v for k, v in s.items() if k != SYNTHETIC_KEY} for s in samples if s.get(SYNTHETIC_KEY)]
    return real, synthetic


def _convert(items: Iterable[tuple[str, Any]]) -> Conversion:
    result = Conversion()
    seen: set[str] = set()
    for kind, item in items:
        try:
            sample = record_to_sample(item) if kind == "record" else normalize_sample(item)
        except SkipSample as skip:
            result.skipped[skip.reason] += 1
            continue
        key = sample_key(sample)
        if key in seen:
            result.skipped["duplicate"] += 1
            continue
        seen.add(key)
        result.samples.append(sample)
    return result


def records_to_samples(records: Iterable[Record]) -> Conversion:
    """Usable samples from log records, in order, exact duplicates removed."""
    return _convert(("record", record) for record in records)


def chats_to_samples(chats: Iterable[Any]) -> Conversion:
    """Validated samples from `{"messages": [...]}` chats, exact duplicates removed."""
    return _convert(("chat", chat) for chat in chats)


# --- files --------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[Any]:
    """Parsed lines of a JSONL file (blank lines ignored)."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{number}: not JSON: {exc.msg}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


def _kind(line: Any) -> str:
    is_record = isinstance(line, dict) and "request" in line and "response" in line
    return "record" if is_record else "chat"


def load_samples(path: Path) -> Conversion:
    """Samples from a JSONL file whose lines are log records or `{"messages": [...]}` chats
    (detected per line, so an export from `/admin/logs/export` works as is)."""
    return _convert((_kind(line), line) for line in read_jsonl(path))


def default_store_url(data_dir: Path) -> str:
    """The gateway's embedded default store for a data dir (its settings' `store_url`)."""
    return f"sqlite:///{data_dir / 'understudy.db'}"


def load_route_records(store_url: str, route: str) -> Iterator[Record]:
    """The route's log records from the gateway's store at `store_url`: its users' traffic,
    then the synthetic pairs the gateway generated for it (kind `synthetic`)."""
    # Imported here: the trainer runs without the gateway package when given --data.
    from gateway.store import open_store

    path = Path(store_url.removeprefix("sqlite:///")) if store_url.startswith("sqlite:///") else None
    if path is not None and not path.is_file():
        raise DataError(f"no log store at {path}: nothing logged yet, or pass --data FILE")
    try:
        store = open_store(store_url)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    try:
        yield from store.iter_records(route=route, kind="user")
        yield from store.iter_records(route=route, kind="synthetic")
    finally:
        store.close()


def write_jsonl(path: Path, samples: Iterable[Sample]) -> int:
    """Write samples one per line; return how many."""
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
            count += 1
    return count


def load_chat_dataset(path: Path, cache_dir: Path) -> Dataset:
    """A `datasets.Dataset` of a samples JSONL. Messages and tools are typed as JSON values:
    inferring an Arrow struct would merge keys across rows (null-filling tool schemas and
    absent fields) or fail on mixed types."""
    from datasets import Dataset, Features, Json, List, load_dataset

    # Every key a sample may have must be declared: the json builder refuses unknown columns.
    features = Features(
        {"messages": List(Json()), "tools": List(Json()), **{key: Json() for key in REPLAYED_FIELDS}}
    )
    if path.stat().st_size == 0:  # e.g. no held-out split: the json builder rejects empty files
        return Dataset.from_dict({key: [] for key in features}, features=features)
    return load_dataset(
        "json", data_files=str(path), features=features, split="train", cache_dir=str(cache_dir)
    )


# --- identity and split -------------------------------------------------------------------


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def prompt_messages(sample: Sample) -> list[dict[str, Any]]:
    """Everything before the last assistant message: what the model is asked."""
    messages = sample["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_key(sample: Sample) -> str:
    return _digest({"messages": prompt_messages(sample), "tools": sample.get("tools")})


def sample_key(sample: Sample) -> str:
    return _digest({"messages": sample["messages"], "tools": sample.get("tools")})


def heldout_bucket(sample: Sample) -> float:
    """A stable number in [0, 1) from the prompt hash; below the eval fraction means held out."""
    return int(prompt_key(sample)[:16], 16) / 2**64


def split_samples(samples: list[Sample], eval_fraction: float = 0.2) -> tuple[list[Sample], list[Sample]]:
    """(train, heldout), disjoint by prompt, each in input order. With at least
    MIN_SAMPLES_FOR_HELDOUT samples and a non-zero fraction, at least one is held out
    (the lowest bucket), and at least one always stays for training."""
    buckets = [heldout_bucket(sample) for sample in samples]
    held = {i for i, bucket in enumerate(buckets) if bucket < eval_fraction}
    if not held and eval_fraction > 0 and len(samples) >= MIN_SAMPLES_FOR_HELDOUT:
        lowest = buckets.index(min(buckets))
        held = {i for i, b in enumerate(buckets) if b == buckets[lowest]}
    if len(held) == len(samples) and samples:
        highest = max(held, key=lambda i: buckets[i])
        held = {i for i in held if buckets[i] != buckets[highest]}
    train = [s for i, s in enumerate(samples) if i not in held]
    heldout = [s for i, s in enumerate(samples) if i in held]
    return train, heldout


def offers_tools(samples: Iterable[Sample]) -> bool:
    """Whether any sample's request offered tools (an adapter trained on none has never seen
    the tools prompt, so the gateway keeps tool requests on the cloud for it)."""
    return any(sample.get("tools") for sample in samples)


def data_hash(samples: Iterable[Sample]) -> str:
    """Order-independent hash of a sample set (what an adapter was trained and judged on)."""
    return _digest(sorted(sample_key(sample) for sample in samples))
