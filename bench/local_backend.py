"""Benchmark the local backend on the bundled SmolLM2-135M-Instruct.

1. Single stream: tokens/s through the server (streamed chat, greedy, fixed length) against
   `model.generate` called directly in this process. Target: server >= 90% of direct.
2. Batching: aggregate tokens/s of 8 concurrent requests against 1. Target: >= 3x.

Each round measures direct, one stream and 8 streams back to back, and the ratios are taken
within a round, so a neighbour's load on a shared machine hits both sides of a ratio alike;
the table shows medians over rounds.

Usage: .venv/bin/python bench/local_backend.py [--tokens 128] [--rounds 3] [--threads N]
The model cache lives under --data-dir (default: $UNDERSTUDY_DATA_DIR or ./.understudy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import httpx
import openai
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from local_backend.loading import DEFAULT_MODEL, load_model  # noqa: E402

# The modes --precision compares: server options of each.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "fp32": ("--dtype", "float32"),
    "bf16": ("--dtype", "bfloat16"),
    "int8": ("--dtype", "bfloat16", "--quantize", "int8"),
    "int4": ("--dtype", "bfloat16", "--quantize", "int4"),
}

QUESTIONS = [
    "Tell me about the history of Paris.",
    "Explain how a bicycle works.",
    "Write a short story about a cat.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "What makes a good cup of coffee?",
    "How do airplanes fly?",
    "Give advice to a new gardener.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("UNDERSTUDY_DATA_DIR", ".understudy"))
    )
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, both sides (default: torch's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--precision",
        action="store_true",
        help="instead: fp32, bf16 and int8 servers side by side, on --model and a TinyLlama-shaped model",
    )
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="with --precision: which modes")
    parser.add_argument(
        "--big-tokens",
        type=int,
        default=16,
        help="with --precision: tokens/request on the TinyLlama-shaped model",
    )
    parser.add_argument(
        "--big-rounds", type=int, default=1, help="with --precision: rounds on the TinyLlama-shaped model"
    )
    parser.add_argument("--skip-big", action="store_true", help="with --precision: only --model")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: argparse.Namespace, port: int, log: Path, model: str | None = None, extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "local_backend", "--model", model or args.model, "--port", str(port)]
    command += ["--data-dir", str(args.data_dir), "--log-level", "warning"]
    command += ["--max-batch-size", str(args.concurrency), *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the backend exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the backend did not become ready")


def direct_tokens_per_s(model: Any, tokenizer: Any, question: str, tokens: int) -> float:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - ids["input_ids"].shape[1]) / elapsed


def request(model: str, question: str, tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": True},
    }


async def one_stream(client: openai.AsyncOpenAI, model: str, question: str, tokens: int) -> int:
    stream = await client.chat.completions.create(**request(model, question, tokens))
    generated = 0
    async for chunk in stream:
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
    return generated


async def server_tokens_per_s(
    client: openai.AsyncOpenAI, model: str, questions: list[str], tokens: int
) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(*(one_stream(client, model, q, tokens) for q in questions))
    return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    args = parse_args()
    if args.precision:
        return run_precision(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model, args.data_dir, device="cpu")
    port = free_port()
    # Like with like: `model.generate` above runs the fp32 model (the server would pick by `auto`).
    server = start_server(args, port, args.data_dir / "bench-backend.log", extra=PRECISIONS["fp32"])
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600
    )
    served = args.model
    try:
        figures = asyncio.run(measure(args, client, served, model, tokenizer))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(args, figures)
    return 0


async def measure(
    args: argparse.Namespace, client: openai.AsyncOpenAI, served: str, model: Any, tokenizer: Any
) -> dict[str, Any]:
    # Warm both sides once (first-call allocations), then alternate so load drifts hit both.
    direct_tokens_per_s(model, tokenizer, QUESTIONS[0], 8)
    await server_tokens_per_s(client, served, QUESTIONS[:1], 8)
    direct, single, batched = [], [], []
    for i in range(args.rounds):
        question = QUESTIONS[i % len(QUESTIONS)]
        direct.append(direct_tokens_per_s(model, tokenizer, question, args.tokens))
        single.append(await server_tokens_per_s(client, served, [question], args.tokens))
        many = [QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(args.concurrency)]
        batched.append(await server_tokens_per_s(client, served, many, args.tokens))
    return {
        "model": args.model,
        "tokens_per_request": args.tokens,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "direct_tps": direct,
        "server_single_tps": single,
        "server_concurrent_tps": batched,
    }


def report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    direct, single, batched = (
        figures[k] for k in ("direct_tps", "server_single_tps", "server_concurrent_tps")
    )
    vs_direct = statistics.median(s / d for s, d in zip(single, direct, strict=True))
    vs_single = statistics.median(b / s for b, s in zip(batched, single, strict=True))
    figures.update(server_vs_direct=vs_direct, concurrent_vs_single=vs_single)
    print(f"\nlocal backend on {figures['model']}: {args.tokens} tokens/request, median of {args.rounds} rounds, "
          f"torch threads {figures['torch_threads']}, load avg {figures['load_average'][0]:.2f}")  # fmt: skip
    rows = [
        ("model.generate, direct", statistics.median(direct), ""),
        ("server, 1 stream", statistics.median(single), f"{vs_direct:.0%} of direct (target >= 90%)"),
        (
            f"server, {args.concurrency} concurrent",
            statistics.median(batched),
            f"{vs_single:.2f}x one stream (target >= 3x)",
        ),
    ]
    print(f"{'':28} {'tokens/s':>9}")
    for name, value, note in rows:
        print(f"{name:28} {value:9.1f}  {note}")
    print("per round (direct / 1 stream / concurrent):", "; ".join(
        f"{d:.1f} / {s:.1f} / {b:.1f}" for d, s, b in zip(direct, single, batched, strict=True)))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


# TinyLlama-1.1B's sizes; the vocabulary is the bundled tokenizer's (49152, not 32000), so
# this model holds 3% more weights than TinyLlama: a conservative speed figure.
TINYLLAMA_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def build_tinyllama_shaped(args: argparse.Namespace) -> Path:
    """A randomly initialised Llama with TinyLlama-1.1B's sizes and the bundled model's
    tokenizer, saved once (bf16 safetensors) under the data dir; built offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = args.data_dir / "models" / "tinyllama-1.1b-shaped-random"
    if (target / "config.json").is_file():
        return target
    _, tokenizer, _ = load_model(args.model, args.data_dir, device="cpu")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINYLLAMA_SHAPE,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # half the memory and time to initialise
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


async def precision_rounds(
    args: argparse.Namespace, clients: dict[str, openai.AsyncOpenAI], served: str, tokens: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Per mode, single-stream and concurrent tok/s; modes alternate within each round."""
    figures: dict[str, dict[str, list[float]]] = {
        m: {"single_tps": [], "concurrent_tps": []} for m in clients
    }
    for client in clients.values():  # first-call allocations
        await server_tokens_per_s(client, served, QUESTIONS[:1], 4)
    for i in range(rounds):
        many = [QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(args.concurrency)]
        for mode, client in clients.items():
            figures[mode]["single_tps"].append(await server_tokens_per_s(client, served, many[:1], tokens))
            figures[mode]["concurrent_tps"].append(await server_tokens_per_s(client, served, many, tokens))
    return figures


def measure_precisions(args: argparse.Namespace, model: str, tokens: int, rounds: int) -> dict[str, Any]:
    """Start one server per mode on `model` (all at once, so rounds can alternate), measure."""
    modes = [m for m in args.precisions.split(",") if m]
    servers: list[subprocess.Popen[bytes]] = []
    clients: dict[str, openai.AsyncOpenAI] = {}
    try:
        for mode in modes:
            port = free_port()
            log = args.data_dir / f"bench-backend-{mode}.log"
            servers.append(start_server(args, port, log, model, PRECISIONS[mode]))
            clients[mode] = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600
            )
        started = time.monotonic()
        figures = asyncio.run(precision_rounds(args, clients, model, tokens, rounds))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=60)
    return {
        "model": model,
        "tokens_per_request": tokens,
        "rounds": rounds,
        "seconds": round(time.monotonic() - started, 1),
        "load_average": os.getloadavg(),
        "modes": {mode: {**PRECISION_NOTES[mode], **values} for mode, values in figures.items()},
    }


PRECISION_NOTES: dict[str, dict[str, str]] = {
    "fp32": {"weights": "float32", "activations": "float32"},
    "bf16": {"weights": "bfloat16", "activations": "bfloat16"},
    "int8": {"weights": "int8 (torchao, per channel; head in bf16)", "activations": "bfloat16"},
    "int4": {
        "weights": "int4 (torchao CPU kernel, per group of 64/128; head too)",
        "activations": "bfloat16",
    },
}


def run_precision(args: argparse.Namespace) -> int:
    runs = [measure_precisions(args, args.model, args.tokens, args.rounds)]
    if not args.skip_big:
        big = build_tinyllama_shaped(args)
        runs.append(measure_precisions(args, str(big), args.big_tokens, args.big_rounds))
    for run in runs:
        report_precision(args, run)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "runs": runs}, indent=2))
    return 0


def report_precision(args: argparse.Namespace, run: dict[str, Any]) -> None:
    modes = run["modes"]
    base = modes.get("fp32")
    print(f"\n{Path(run['model']).name}: {run['tokens_per_request']} tokens/request, median of "
          f"{run['rounds']} round(s), {args.concurrency} concurrent, load avg {run['load_average'][0]:.2f}")  # fmt: skip
    print(
        f"{'mode':6} {'1 stream tok/s':>15} {'vs fp32':>8} {f'{args.concurrency} concurrent tok/s':>22} {'vs fp32':>8}"
    )
    for mode, values in modes.items():
        single, many = statistics.median(values["single_tps"]), statistics.median(values["concurrent_tps"])
        ratios = ["", ""]
        if base is not None:
            # Within-round ratios: a neighbour's load hits both sides of each alike.
            ratios = [
                f"{statistics.median(a / b for a, b in zip(values[k], base[k], strict=True)):.2f}x"
                for k in ("single_tps", "concurrent_tps")
            ]
        values.update(
            single_median=single,
            concurrent_median=many,
            single_vs_fp32=ratios[0],
            concurrent_vs_fp32=ratios[1],
        )
        print(f"{mode:6} {single:15.2f} {ratios[0]:>8} {many:22.2f} {ratios[1]:>8}")


if __name__ == "__main__":
    raise SystemExit(main())
