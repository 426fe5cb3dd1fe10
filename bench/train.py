"""Trainer throughput: the production training path (`trainer.train.train_adapter`, i.e. the
HF Trainer with our collator and progress callback) against a plain peft + torch loop on the
same model, LoRA config, tokenized data and optimizer settings, measured in one run.

    .venv/bin/python bench/train.py [--model SmolLM2-135M-Instruct] [--batch 4] [--seq 256]
                                    [--steps 8] [--warmup 2] [--rounds 2] [--mode both]

Each arm runs in its own process (so its peak RSS is its own). The cores are shared with
other work, so two measurements are taken:
- `side_by_side`: both arms at the same time, one thread each; only steps inside the window
  where both are measuring count, so whatever the neighbours do hits both arms alike. This is
  the ratio to trust.
- `sequential`: one arm at a time with the trainer's default threads (every core),
  alternating A B / B A round by round: the absolute seconds per step, as noisy as the
  machine is.
Figures are medians of per-step wall time; CPU time per step is reported alongside.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FILLER = (
    "The committee reviewed the quarterly figures, noted the rising costs of shipping and "
    "storage, and asked the team to propose savings without delaying the spring release. "
)


def make_chats(count: int) -> list[dict[str, Any]]:
    """Chats long enough that every example is cut at --seq tokens (so batches are full width)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Expand note {i}: " + FILLER},
                {"role": "assistant", "content": f"Note {i}: " + FILLER * 12},
            ]
        }
        for i in range(count)
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Stamp = tuple[float, float]  # (monotonic wall clock, shared across processes; process CPU time)


def stamp() -> Stamp:
    return time.monotonic(), time.process_time()


def steps_from(stamps: list[Stamp], skip: int) -> list[dict[str, float]]:
    """Per-step intervals after the first `skip` ones (loading and warm-up)."""
    return [
        {"start": a[0], "end": b[0], "wall": b[0] - a[0], "cpu": b[1] - a[1]}
        for a, b in itertools.pairwise(stamps)
    ][skip:]


def run_trainer_arm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from trainer.dataset import write_jsonl
    from trainer.spec import TrainSpec
    from trainer.train import DataFiles, train_adapter

    train_path, heldout_path = work / "train.jsonl", work / "heldout.jsonl"
    write_jsonl(train_path, make_chats(args.batch * (args.steps + args.warmup + 1)))
    write_jsonl(heldout_path, [])
    spec = TrainSpec(
        base_model=args.model,
        max_length=args.seq,
        batch_size=args.batch,
        max_steps=args.steps + args.warmup + 1,
        epochs=1,
        warmup_ratio=0.0,
        threads=args.threads or None,
    )
    stamps = [stamp()]

    def report(**changes: Any) -> None:
        if "loss" in changes:  # one log event per optimizer step
            stamps.append(stamp())

    output = work / "adapter"
    output.mkdir()
    result = train_adapter(DataFiles(train_path, heldout_path), spec, output, Path(args.cache), report)
    return {"steps": steps_from(stamps, args.warmup + 1), "loss": result.train_loss}


def run_plain_arm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    from trainer.dataset import load_chat_dataset, write_jsonl
    from trainer.spec import TrainSpec
    from trainer.train import PadCollator, attach_lora, load_base, tokenize_dataset

    spec = TrainSpec(
        base_model=args.model, max_length=args.seq, batch_size=args.batch, threads=args.threads or None
    )
    train_path = work / "train.jsonl"
    write_jsonl(train_path, make_chats(args.batch * (args.steps + args.warmup + 1)))
    base = load_base(spec, Path(args.cache))
    dataset, _ = tokenize_dataset(load_chat_dataset(train_path, work / "cache"), base.tokenizer, args.seq)
    dataset = dataset.remove_columns(["length"])
    model = attach_lora(base.model, spec)
    model.train()
    loader = DataLoader(
        dataset, batch_size=args.batch, shuffle=True, collate_fn=PadCollator(base.tokenizer.pad_token_id)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.0)
    stamps = [stamp()]
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # the Trainer clips too: same work
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(stamp())
    return {"steps": steps_from(stamps, args.warmup + 1), "loss": float(loss)}


def default_threads() -> int:
    from trainer.spec import default_threads as trainer_default

    return trainer_default()


def run_arm(args: argparse.Namespace) -> None:
    """Child process: run one arm, print its measurements as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        runner = run_trainer_arm if args.arm == "trainer" else run_plain_arm
        measured = runner(args, Path(work))
    measured["peak_rss_mib"] = round(peak_rss_mib(), 1)
    measured["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(measured), flush=True)


def launch(arm: str, args: argparse.Namespace, threads: int) -> subprocess.Popen[str]:
    flags = ("model", "cache", "batch", "seq", "steps", "warmup")
    forwarded = [part for flag in flags for part in (f"--{flag}", str(getattr(args, flag)))]
    command = [sys.executable, __file__, "--arm", arm, "--threads", str(threads), *forwarded]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(arm: str, process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} arm failed ({process.returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def overlapping(runs: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Each arm's steps that lie inside the window where both arms were measuring."""
    start = max(run["steps"][0]["start"] for run in runs.values())
    end = min(run["steps"][-1]["end"] for run in runs.values())
    return {
        arm: [s for s in run["steps"] if s["start"] >= start and s["end"] <= end] for arm, run in runs.items()
    }


def summarise(steps: list[dict[str, float]], runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    if not steps:
        return {"measured_steps": 0}
    wall = statistics.median(s["wall"] for s in steps)
    return {
        "measured_steps": len(steps),
        "seconds_per_step": round(wall, 3),
        "cpu_seconds_per_step": round(statistics.median(s["cpu"] for s in steps), 3),
        "samples_per_second": round(batch / wall, 3),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "threads": runs[0]["threads"],
    }


def compare(trainer: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"trainer": trainer, "plain_loop": plain}
    if trainer.get("measured_steps") and plain.get("measured_steps"):
        result["trainer_over_plain"] = round(trainer["seconds_per_step"] / plain["seconds_per_step"], 3)
        result["trainer_over_plain_cpu"] = round(
            trainer["cpu_seconds_per_step"] / plain["cpu_seconds_per_step"], 3
        )
    return result


def side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    steps: dict[str, list[dict[str, float]]] = {"trainer": [], "plain": []}
    runs: dict[str, list[dict[str, Any]]] = {"trainer": [], "plain": []}
    for round_index in range(args.rounds):
        processes = {arm: launch(arm, args, threads=1) for arm in ("trainer", "plain")}
        results = {arm: collect(arm, process) for arm, process in processes.items()}
        for arm, window in overlapping(results).items():
            steps[arm] += window
            runs[arm].append(results[arm])
        print(f"side by side, round {round_index + 1} done", file=sys.stderr, flush=True)
    return compare(*(summarise(steps[arm], runs[arm], args.batch) for arm in ("trainer", "plain")))


def sequential(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"trainer": [], "plain": []}
    threads = args.seq_threads or default_threads()
    for round_index in range(args.rounds):
        for arm in ("trainer", "plain") if round_index % 2 == 0 else ("plain", "trainer"):
            runs[arm].append(collect(arm, launch(arm, args, threads)))
        print(f"sequential, round {round_index + 1} done", file=sys.stderr, flush=True)
    return compare(
        *(
            summarise([s for run in runs[arm] for s in run["steps"]], runs[arm], args.batch)
            for arm in ("trainer", "plain")
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--cache", default=str(REPO / ".understudy"), help="where the GGUF is converted once")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run left out of the figures")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mode", choices=["both", "side-by-side", "sequential"], default="both")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    parser.add_argument("--arm", choices=["trainer", "plain"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--seq-threads", type=int, default=0, help="threads in sequential mode (default: the trainer's)"
    )
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args)
        return
    result: dict[str, Any] = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "cpus": os.cpu_count(),
    }
    if args.mode in ("both", "side-by-side"):
        result["side_by_side"] = side_by_side(args)
    if args.mode in ("both", "sequential"):
        result["sequential"] = sequential(args)
    result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
