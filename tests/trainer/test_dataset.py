"""Records and chats → samples: filtering, conversion, duplicates, the held-out split."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.samples import word_chat, write_jsonl
from trainer.dataset import (
    data_hash,
    default_store_url,
    load_chat_dataset,
    load_route_records,
    load_samples,
    offers_tools,
    prompt_key,
    records_to_samples,
    split_samples,
)
from trainer.dataset import write_jsonl as write_samples
from trainer.errors import DataError

MakeRecord = Callable[..., dict[str, Any]]


def test_usable_record_becomes_chat_with_system_prompt(make_record: MakeRecord) -> None:
    result = records_to_samples([make_record()])
    assert result.samples == [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"backend": "local"}, "not_cloud"),
        ({"backend": "failover"}, "not_cloud"),
        ({"status": 500}, "status"),
        ({"outcome": "disconnected"}, "outcome"),
        ({"outcome": "error"}, "outcome"),
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"response": "upstream said no"}, "malformed"),
    ],
)
def test_unusable_records_are_skipped_with_reason(
    make_record: MakeRecord, overrides: dict, reason: str
) -> None:
    result = records_to_samples([make_record(**overrides)])
    assert result.samples == []
    assert result.skipped == {reason: 1}


def test_truncated_and_empty_answers_are_skipped(make_record: MakeRecord) -> None:
    truncated = make_record()
    truncated["response"]["choices"][0]["finish_reason"] = "length"
    result = records_to_samples([truncated, make_record(answer=None), make_record(answer="")])
    assert result.samples == []
    assert result.skipped == {"truncated": 1, "empty_answer": 2}


def test_exact_duplicates_removed_but_same_prompt_other_answer_kept(make_record: MakeRecord) -> None:
    records = [make_record(), make_record(id=2), make_record(id=3, answer="four")]
    result = records_to_samples(records)
    assert [s["messages"][-1]["content"] for s in result.samples] == ["4", "four"]
    assert result.skipped == {"duplicate": 1}


def test_tool_calls_tools_and_tool_results_kept_in_openai_form(make_record: MakeRecord) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    record = make_record(answer=None)
    record["request"]["tools"] = tools
    record["response"]["choices"][0]["message"]["tool_calls"] = [call]
    record["response"]["choices"][0]["finish_reason"] = "tool_calls"
    followup = make_record(answer="It is 4.")
    followup["request"]["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    followup["request"]["tools"] = tools
    first, second = records_to_samples([record, followup]).samples
    assert first["tools"] == tools
    assert first["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    # History turns are not the cloud's answer to this request: kept as context, not trained.
    assert second["messages"][2] == {"role": "assistant", "content": None, "tool_calls": [call], "weight": 0}
    assert second["messages"][3] == {"role": "tool", "content": "4", "tool_call_id": "call_1"}
    assert second["messages"][4] == {"role": "assistant", "content": "It is 4."}


def test_samples_keep_the_requests_tools_tool_choice_and_response_format(
    tmp_path: Path, make_record: MakeRecord
) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    asked = {
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "parallel_tool_calls": False,
    }
    record = make_record(answer='{"sum": 4}')
    record["request"].update(asked)
    plain = make_record(prompt="Plain?")
    plain["request"].update({"tools": [], "tool_choice": None})
    with_tools, without = records_to_samples([record, plain]).samples
    assert {key: with_tools[key] for key in asked} == asked
    assert set(without) == {"messages"}  # keys absent when the request had none
    assert offers_tools([with_tools]) and not offers_tools([without])
    # heldout.jsonl (and train.jsonl) lines carry them, and the training loader accepts them
    path = tmp_path / "heldout.jsonl"
    write_samples(path, [with_tools, without])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [with_tools, without]
    dataset = load_chat_dataset(path, tmp_path / "cache")
    assert dataset[0]["tool_choice"] == "auto" and dataset[0]["response_format"] == {"type": "json_object"}
    assert dataset[1]["tools"] is None and dataset[1]["tool_choice"] is None


def test_content_parts_flattened_and_images_skipped(make_record: MakeRecord) -> None:
    parts = make_record()
    parts["request"]["messages"][1]["content"] = [
        {"type": "text", "text": "What is"},
        {"type": "text", "text": "2+2?"},
    ]
    image = make_record(id=2, prompt="x")
    image["request"]["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "data:..."}}]
    result = records_to_samples([parts, image])
    assert result.samples[0]["messages"][1]["content"] == "What is\n2+2?"
    assert result.skipped == {"non_text_content": 1}


def test_developer_role_becomes_system(make_record: MakeRecord) -> None:
    record = make_record()
    record["request"]["messages"][0]["role"] = "developer"
    assert records_to_samples([record]).samples[0]["messages"][0]["role"] == "system"


def test_jsonl_accepts_chats_and_records_mixed(tmp_path: Path, make_record: MakeRecord) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [word_chat("apple"), make_record(), {"messages": "nope"}])
    result = load_samples(path)
    assert len(result.samples) == 2
    assert result.skipped == {"malformed": 1}


def test_split_is_disjoint_deterministic_and_stable_as_data_grows() -> None:
    samples = [word_chat(f"w{i}") for i in range(200)]
    train, heldout = split_samples(samples[:100], 0.2)
    assert {prompt_key(s) for s in train}.isdisjoint(prompt_key(s) for s in heldout)
    assert len(train) + len(heldout) == 100
    assert 8 <= len(heldout) <= 35
    assert split_samples(samples[:100], 0.2) == (train, heldout)
    grown_train, grown_heldout = split_samples(samples, 0.2)
    # Every sample keeps its side when more data arrives.
    assert all(s in grown_heldout for s in heldout)
    assert all(s in grown_train for s in train)


def test_same_prompt_never_on_both_sides() -> None:
    samples = []
    for i in range(60):
        chat = word_chat(f"w{i % 20}")
        chat["messages"][-1]["content"] = f"answer {i}"
        samples.append(chat)
    train, heldout = split_samples(samples, 0.3)
    assert {prompt_key(s) for s in train}.isdisjoint(prompt_key(s) for s in heldout)


def test_split_holds_out_at_least_one_from_five() -> None:
    for n in range(5, 12):
        train, heldout = split_samples([word_chat(f"x{i}") for i in range(n)], 0.01)
        assert len(heldout) >= 1 and len(train) >= 1
    train, heldout = split_samples([word_chat(f"x{i}") for i in range(4)], 0.01)
    assert len(train) == 4 and heldout == []
    assert split_samples([word_chat("a")], 0.9) == ([word_chat("a")], [])


def test_data_hash_ignores_order() -> None:
    samples = [word_chat(w) for w in ("a", "b", "c")]
    assert data_hash(samples) == data_hash(samples[::-1])
    assert data_hash(samples) != data_hash(samples[:2])


def test_datasets_round_trip_keeps_heterogeneous_messages(tmp_path: Path, make_record: MakeRecord) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"properties": {"x": {"enum": [1, "a"]}}}},
        }
    ]
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_tools = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
        "tools": tools,
    }
    rows = [with_tools, word_chat("apple")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset = load_chat_dataset(path, tmp_path / "cache")
    assert dataset[0]["messages"] == with_tools["messages"]
    assert dataset[0]["tools"] == tools
    assert dataset[1]["messages"] == word_chat("apple")["messages"]
    assert dataset[1]["tools"] is None
    assert json.loads(path.read_text().splitlines()[0]) == with_tools


def test_route_records_without_a_log_store_is_a_data_error(data_dir: Path) -> None:
    with pytest.raises(DataError, match="no log store"):
        list(load_route_records(default_store_url(data_dir), "r"))


def test_route_records_from_the_gateway_store_become_samples(data_dir: Path, make_record: MakeRecord) -> None:
    from gateway.store.base import LogRecord
    from gateway.store.sqlite import SQLiteStore

    def logged(route: str, backend: str, answer: str) -> LogRecord:
        record = make_record(answer=answer)
        return LogRecord(
            request_id=answer,
            ts=1.0,
            route=route,
            backend=backend,
            endpoint="/v1/chat/completions",
            method="POST",
            status=200,
            outcome="ok",
            request=json.dumps(record["request"]),
            response=json.dumps(record["response"]),
        )

    store = SQLiteStore(data_dir / "elsewhere.db")  # not the default path: the URL names it
    store.open()
    store.insert_records(
        [logged("r", "cloud", "4"), logged("r", "local", "5"), logged("other", "cloud", "6")]
    )
    store.close()
    result = records_to_samples(load_route_records(f"sqlite:///{data_dir / 'elsewhere.db'}", "r"))
    assert [s["messages"][-1]["content"] for s in result.samples] == ["4"]
    assert result.skipped == {"not_cloud": 1}


def test_an_unsupported_store_url_is_a_data_error() -> None:
    with pytest.raises(DataError, match="unsupported"):
        list(load_route_records("mysql://db/logs", "r"))


def test_imports_are_trained_on_and_held_out_only_when_allowed(data_dir: Path) -> None:
    from trainer.dataset import IMPORTS_DIR, load_imports, origin_counts, split_train_only

    folder = data_dir / IMPORTS_DIR / "r"
    folder.mkdir(parents=True)
    for name, heldout in (("imp_a", True), ("imp_b", False)):
        write_jsonl(folder / f"{name}.jsonl", [word_chat(f"{name} {i}") for i in range(3)])
        (folder / f"{name}.json").write_text(json.dumps({"id": name, "heldout": heldout}))
    samples = load_imports(data_dir, "r")
    assert origin_counts(samples) == {"real_count": 0, "synthetic_count": 0, "imported_count": 6}
    judged, train_only = split_train_only(samples)
    assert len(judged) == 3 and len(train_only) == 3
    assert all("origin" not in sample for sample in judged + train_only)
    assert all("imp_b" in json.dumps(sample) for sample in train_only)
