"""The old training rule against the new one, on the same pairs of the demo task (name/age/city
extraction, gateway/demo/task.py) with the bundled SmolLM2: wall time, CPU time, steps and the
pass rate (JSON-equal answers) on fresh prompts the adapter never saw.

    .venv/bin/python bench/train_rule.py [--pairs 100] [--heldout 50] [--threads 1] [--retrain-pairs 1300 [--retrain-only]]

- old: 10 epochs (what `epochs_for(80)` gave: round(10000 / 80) clamped to 1..10), every
  non-held-out pair trained on, no validation slice, no early stopping;
- new: the defaults (budget of examples seen, epoch cap, early stopping on a validation slice).
- retrain (with --retrain-pairs N): the new rule's first job on --pairs, then the next job on
  the log grown to N pairs, starting from that adapter (the gateway's retrain).
Each runs the production job (`trainer.runner.run_job`) in their own process, one after the
other, with the same thread count; the pass rate is measured with greedy decoding on prompts
drawn with another seed than the training ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OLD_RULE = {"epochs": 10, "validation_fraction": 0.0, "early_stopping_patience": 0}
NEW_RULE: dict[str, Any] = {}
MAX_NEW_TOKENS = 40
TASK = "gateway/demo/task.py (name/age/city extraction), CPU"
GENERATION_BATCH = 8


def chats(count: int, seed: int) -> list[dict[str, Any]]:
    from gateway.demo import task

    return [
        {"messages": [*e.messages(), {"role": "assistant", "content": e.answer}]}
        for e in task.examples(count, seed)
    ]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train(
    args: argparse.Namespace, work: Path, pairs: int | None = None, init: Path | None = None
) -> tuple[dict[str, Any], float, float, Path]:
    """(meta.json, wall seconds, CPU seconds, adapter folder) of one job on the task's pairs
    (`pairs` of them, else args.pairs; args.data instead when given), from `init` if given."""
    from trainer.dataset import write_jsonl
    from trainer.runner import JobContext, run_job
    from trainer.spec import TrainSpec

    data = args.data
    if data is None:  # the task's pairs, all from "real traffic"; more pairs extend the log
        data = work / f"pairs-{pairs or args.pairs}.jsonl"
        write_jsonl(data, chats(pairs or args.pairs, seed=11))
    rule = OLD_RULE if args.arm == "old" else NEW_RULE
    spec = TrainSpec(
        data=data,
        base_model=args.model,
        model_cache=Path(args.cache),
        threads=args.threads,
        init_adapter=init,
        **rule,
    )
    data_dir = work / "data"
    started, cpu = time.monotonic(), cpu_seconds()
    job = f"ftjob-{args.arm}-{'retrain' if init else 'first'}"
    run_job(JobContext("task", data_dir, job, data_dir / f"{job}.json"), spec)
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu
    adapter = max((data_dir / "adapters" / "task").glob("v*"), key=lambda p: int(p.name[1:]))
    meta = json.loads((adapter / "meta.json").read_text())
    return meta, wall, cpu, adapter


def answers(model: Any, tokenizer: Any, prompts: list[list[dict[str, Any]]]) -> list[str]:
    """Greedy answers, in batches (left-padded), rendered as training renders them."""
    import torch

    from trainer.chat_format import render

    tokenizer.padding_side = "left"
    texts = [render(tokenizer, {"messages": p}, generation_prompt=True) for p in prompts]
    out: list[str] = []
    for start in range(0, len(texts), GENERATION_BATCH):
        batch = tokenizer(texts[start : start + GENERATION_BATCH], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(
                **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        width = batch["input_ids"].shape[1]
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def pass_rate(args: argparse.Namespace, adapter: Path) -> float:
    from peft import PeftModel

    from gateway.demo.run import same_json
    from local_backend.loading import load_model

    base, tokenizer, _ = load_model(args.model, Path(args.cache), device="cpu")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    fresh = chats(args.heldout, seed=13)
    got = answers(model, tokenizer, [c["messages"][:-1] for c in fresh])
    expected = [c["messages"][-1]["content"] for c in fresh]
    return sum(same_json(a, e) for a, e in zip(got, expected, strict=True)) / len(fresh)


def run_arm(args: argparse.Namespace) -> None:
    """Child process: train one arm, measure it, print one RESULT line."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    first: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-rule-") as tmp:
        meta, wall, cpu, adapter = train(args, Path(tmp))
        if args.arm == "retrain":  # the log grew to --retrain-pairs; the next job starts from v1
            first = {
                "job_wall_s": round(wall, 1),
                "job_cpu_s": round(cpu, 1),
                "steps": meta["steps_run"],
                "train_count": meta["train_count"],
                "validation_count": meta["validation_count"],
            }
            meta, wall, cpu, adapter = train(args, Path(tmp), args.retrain_pairs, init=adapter)
        started = time.monotonic()
        rate = pass_rate(args, adapter)
        judge_s = time.monotonic() - started
    result = {
        "first_job": first,
        "arm": args.arm,
        "job_wall_s": round(wall, 1),
        "job_cpu_s": round(cpu, 1),
        "train_s": meta["timing"]["train_seconds"],
        "seconds_per_step": meta["timing"]["seconds_per_step"],
        "steps": meta["steps_run"],
        "planned_steps": meta["planned_steps"],
        "epochs_planned": meta["hyperparameters"]["epochs"],
        "stop_reason": meta["stop_reason"],
        "train_count": meta["train_count"],
        "validation_count": meta["validation_count"],
        "origins": {key: meta.get(key) for key in ("real_count", "synthetic_count", "heldout_count")},
        "train_loss": meta["train_loss"],
        "heldout_loss": meta["eval_loss"],
        "validation_curve": [
            [p["step"], p["validation_loss"]] for p in meta["loss_curve"] if "validation_loss" in p
        ],
        "pass_rate": rate,
        "pass_rate_prompts": args.heldout,
        "pass_rate_seconds": round(judge_s, 1),
        "threads": meta["threads"],
    }
    print("RESULT " + json.dumps(result), flush=True)


def launch(arm: str, args: argparse.Namespace, data: Path | None = None) -> dict[str, Any]:
    """Train and measure one arm in a fresh process; `data`: a JSONL of log records or chats
    to train on instead of `args.pairs` of the task's pairs."""
    command = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--pairs", str(args.pairs)]
    command += ["--heldout", str(args.heldout), "--threads", str(args.threads), "--cache", args.cache]
    command += ["--retrain-pairs", str(args.retrain_pairs)]
    if data is not None:
        command += ["--data", str(data)]
    load_before = os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} arm failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"{arm}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def warm_model_cache(model: str, cache: Path) -> None:
    """Convert the bundled GGUF once, before either arm is timed."""
    from local_backend.loading import ensure_dense, resolve

    ensure_dense(resolve(model), cache)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="SmolLM2-135M-Instruct", help="base model (a folder for a smoke run)"
    )
    parser.add_argument("--pairs", type=int, default=100, help="logged pairs (20%% go to the held-out split)")
    parser.add_argument("--heldout", type=int, default=50, help="fresh prompts for the pass rate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(REPO / ".understudy"), help="where the GGUF is converted once")
    parser.add_argument("--retrain-only", action="store_true", help="only the retrain arm")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_rule.json")
    parser.add_argument("--arm", choices=["old", "new", "retrain"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--retrain-pairs",
        type=int,
        default=0,
        help="also time a retrain from the new rule's adapter once the log holds this many pairs",
    )
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args)
        return
    warm_model_cache(args.model, Path(args.cache))
    old = launch("old", args) if not args.retrain_only else None
    new = launch("new", args) if not args.retrain_only else None
    retrain = launch("retrain", args) if args.retrain_pairs else None
    result = {
        "task": TASK,
        "model": args.model,
        "pairs": args.pairs,
        "cpus": os.cpu_count(),
        "old_rule": old,
        "new_rule": new,
        "wall_ratio": round(new["job_wall_s"] / old["job_wall_s"], 3) if old and new else None,
        "cpu_ratio": round(new["job_cpu_s"] / old["job_cpu_s"], 3) if old and new else None,
        "pass_rate_delta": round(new["pass_rate"] - old["pass_rate"], 3) if old and new else None,
        "retrain": retrain,
        "retrain_vs_first_wall_ratio": (
            round(retrain["job_wall_s"] / retrain["first_job"]["job_wall_s"], 3) if retrain else None
        ),
        "retrain_vs_first_cpu_ratio": (
            round(retrain["job_cpu_s"] / retrain["first_job"]["job_cpu_s"], 3) if retrain else None
        ),
    }
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
