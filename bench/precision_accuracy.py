"""Held-out accuracy of one fp32-trained adapter served in each local precision.

    .venv/bin/python bench/precision_accuracy.py [--pairs 100] [--heldout 200] [--threads 2]

Trains one LoRA adapter on the demo task (name/age/city extraction, gateway/demo/task.py; the
same task bench/adaptive.py's plain variant runs) with the production trainer in fp32
(`trainer.runner.run_job`, default rule), then serves it on the base loaded as the backend
loads it (`load_model(dtype, quantize)` and `adapters.load_into_model`, which keeps the
adapter in its trained fp32) in fp32, bf16, int8 weights with fp32 and with bf16 activations,
and int4 weights (groups of 32, the head too) with bf16 activations, and counts JSON-equal greedy answers on fresh prompts (drawn
with another seed than the training ones). The issue's rule: a mode that loses more than 2
points against fp32 is not what `local.dtype: auto` picks. Results: bench/results/precision_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/: bench/local_backend.py would shadow the package

from train_rule import answers, chats, train, warm_model_cache  # noqa: E402

MODES = [
    ("float32", "none"),
    ("bfloat16", "none"),
    ("float32", "int8"),
    ("bfloat16", "int8"),
    ("bfloat16", "int4"),  # int4 computes in bf16 (fp32 activations: the kernel's slow path)
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--pairs", type=int, default=100, help="logged pairs the adapter trains on")
    parser.add_argument("--heldout", type=int, default=200, help="fresh prompts for the pass rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(REPO / ".understudy"))
    parser.add_argument("--adapter", type=Path, default=None, help="skip training: measure this adapter")
    parser.add_argument(
        "--modes",
        default=",".join(f"{d}:{q}" for d, q in MODES),
        help="dtype:quantize pairs, comma-separated; the first is the reference (default: all)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "precision_accuracy.json")
    return parser.parse_args()


def task_adapter(model: str, cache: Path, threads: int, pairs: int) -> Path:
    """An fp32 adapter for the demo task trained by the production trainer on `pairs` pairs,
    kept under `cache`/bench so the other precision benchmarks reuse it."""
    target = cache / "bench" / f"task-adapter-fp32-{pairs}"
    if (target / "adapter_config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        train_args = argparse.Namespace(
            data=None, arm="new", model=model, cache=str(cache), threads=threads, pairs=pairs
        )
        _, _, _, trained = train(train_args, Path(tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(trained, target)
    return target


def pass_rate(args: argparse.Namespace, adapter: Path, dtype: str, quantize: str) -> dict[str, Any]:
    import torch

    from gateway.demo.run import same_json
    from local_backend import adapters
    from local_backend.loading import load_model

    model, tokenizer, _ = load_model(args.model, Path(args.cache), "cpu", dtype, quantize)
    adapters.load_into_model(model, adapters.Adapter("task", adapter, "lora_1", 0))
    adapters.activate(model, "lora_1")
    fresh = chats(args.heldout, seed=13)
    started = time.monotonic()
    with torch.inference_mode():
        got = answers(model, tokenizer, [c["messages"][:-1] for c in fresh])
    expected = [c["messages"][-1]["content"] for c in fresh]
    right = sum(same_json(a, e) for a, e in zip(got, expected, strict=True))
    return {
        "dtype": dtype,
        "quantize": quantize,
        "right": right,
        "prompts": len(fresh),
        "pass_rate": right / len(fresh),
        "answers": got,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    args = parse_args()
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    torch.set_num_threads(args.threads)
    warm_model_cache(args.model, Path(args.cache))
    adapter = args.adapter or task_adapter(args.model, Path(args.cache), args.threads, args.pairs)
    meta = json.loads((adapter / "meta.json").read_text()) if (adapter / "meta.json").is_file() else {}
    wanted = [tuple(mode.split(":")) for mode in args.modes.split(",")]
    modes = [pass_rate(args, adapter, dtype, quantize) for dtype, quantize in wanted]
    reference = modes[0]
    for mode in modes:
        mode["points_vs_reference"] = round(100 * (mode["pass_rate"] - reference["pass_rate"]), 1)
        mode["same_answer_as_reference"] = sum(
            a == b for a, b in zip(mode["answers"], reference["answers"], strict=True)
        )
    reference_name = f"{reference['dtype']}:{reference['quantize']}"
    result = {
        "task": "gateway/demo/task.py (name/age/city extraction; bench/adaptive.py plain variant)",
        "model": args.model,
        "pairs": args.pairs,
        "adapter_dtype": "float32",
        "adapter": str(adapter),
        "train_loss": meta.get("train_loss"),
        "threads": args.threads,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "reference": reference_name,
        "modes": [{k: v for k, v in m.items() if k != "answers"} for m in modes],
    }
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
