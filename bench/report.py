"""Render docs/BENCHMARKS.md and docs/bench/*.png from one run's results (bench/results/*.json).

Called by bench/run_all.py at the end of a run; also runnable alone to re-render the last run:

    .venv/bin/python bench/report.py [--results bench/results] [--docs docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from harness import REPO, RESULTS
from matplotlib import ticker

COLORS = {"direct": "#7f7f7f", "understudy": "#1f77b4", "litellm": "#d62728", "llama_cpp": "#ff7f0e"}
LABELS = {
    "direct": "direct",
    "understudy": "Understudy",
    "litellm": "LiteLLM proxy",
    "llama_cpp": "llama-cpp-python",
}


def server_label(name: str) -> str:
    """`llama_cpp_2t` -> `llama-cpp-python, 2 threads`; other names from LABELS."""
    if name.startswith("llama_cpp_") and name.endswith("t"):
        threads = name.removeprefix("llama_cpp_").removesuffix("t")
        return f"llama-cpp-python, {threads} thread{'s' if threads != '1' else ''}"
    return LABELS.get(name, name)


def llama_servers(llama: dict[str, Any]) -> list[str]:
    return [name for name in llama["summary"] if name.startswith("llama_cpp")]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def reproduce(meta: dict[str, Any], step: str) -> list[str]:
    command = meta["steps"].get(step, {}).get("command")
    return [f"Reproduce: `{command}`", ""] if command else []


def loaded(meta: dict[str, Any], results: Path, step: str, filename: str) -> dict[str, Any] | None:
    """A step's results, only if that step ran and succeeded in this run."""
    status = meta["steps"].get(step, {}).get("status")
    path = results / filename
    if status != "ok" or not path.exists():
        return None
    return dict(json.loads(path.read_text()))


def not_run(meta: dict[str, Any], step: str) -> list[str]:
    info = meta["steps"].get(step)
    if info is None:
        return ["Not run in this run.", ""]
    if info["status"] == "skipped":
        return [f"Skipped: {info.get('reason', '')}.", ""]
    tail = info.get("error", "").strip()
    return [f"Failed (exit {info.get('returncode')}); the end of its output:", "", "```", tail, "```", ""]


# --- plots ---------------------------------------------------------------------------------


def save(fig: Any, docs: Path, name: str) -> str:
    out = docs.parent / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"![{name}](bench/{name})"


def line_plot(
    ax: Any, summary: dict[str, Any], mode: str, key: str, ylabel: str, title: str, log_y: bool = True
) -> None:
    for target, by_mode in summary.items():
        cells = by_mode[mode]
        xs = [int(c) for c in cells]
        ys = [cells[c][key] for c in cells]
        ax.plot(xs, ys, marker="o", color=COLORS.get(target), label=LABELS.get(target, target))
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks([int(c) for c in next(iter(summary.values()))[mode]])
    ax.get_xaxis().set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def proxy_plots(proxy: dict[str, Any], docs: Path) -> list[str]:
    summary = proxy["summary"]
    images = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    line_plot(axes[0], summary, "chat", "p50_ms", "ms", "latency p50 (non-streamed)")
    line_plot(axes[1], summary, "chat", "p99_ms", "ms", "latency p99 (non-streamed)")
    images.append(save(fig, docs, "proxy_latency.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    line_plot(axes[0], summary, "chat", "rps", "requests/s", "throughput (non-streamed)")
    line_plot(axes[1], summary, "stream", "rps", "requests/s", "throughput (streamed)")
    images.append(save(fig, docs, "proxy_throughput.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    line_plot(axes[0], summary, "stream", "ttft_p50_ms", "ms", "time to first token p50")
    line_plot(axes[1], summary, "stream", "ttft_p99_ms", "ms", "time to first token p99")
    images.append(save(fig, docs, "proxy_ttft.png"))
    memory = proxy["memory"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(memory)
    width = 0.38
    xs = range(len(names))
    warm = [memory[n]["after_warmup"]["rss_mib"] for n in names]
    peak = [memory[n]["end"]["peak_rss_mib"] for n in names]
    ax.bar([x - width / 2 for x in xs], warm, width, label="after warm-up", color="#9ecae1")
    ax.bar([x + width / 2 for x in xs], peak, width, label="peak", color="#3182bd")
    for x, value in zip(xs, peak, strict=True):
        ax.text(x + width / 2, value, f"{value:.0f}", ha="center", va="bottom")
    ax.set_xticks(list(xs), [LABELS.get(n, n) for n in names])
    ax.set_ylabel("MiB (process tree)")
    ax.set_title("proxy RSS")
    ax.legend()
    images.append(save(fig, docs, "proxy_rss.png"))
    return images


def bars(ax: Any, entries: list[tuple[str, float, str]], title: str) -> None:
    ax.bar([e[0] for e in entries], [e[1] for e in entries], color=[e[2] for e in entries])
    for i, entry in enumerate(entries):
        ax.text(i, entry[1], f"{entry[1]:.0f}", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (aggregate)")
    ax.set_title(title, fontsize=10)


def local_plot(local: dict[str, Any] | None, llama: dict[str, Any] | None, docs: Path) -> list[str]:
    panels: list[tuple[list[tuple[str, float, str]], str]] = []
    if local:
        med, n = local["median"], local["concurrency"]
        panels.append(
            (
                [
                    ("model.generate\n(in-process)", med["direct_tps"], COLORS["direct"]),
                    ("server\n1 stream", med["server_single_tps"], COLORS["understudy"]),
                    (f"server\n{n} concurrent", med["server_concurrent_tps"], COLORS["understudy"]),
                ],
                "Understudy's backend vs model.generate (fp32 torch)",
            )
        )
    if llama and llama.get("built"):
        s, n = llama["summary"], llama["concurrency"]
        entries = [
            (f"Understudy\n{llama['threads']}t, 1 req", s["understudy"]["single_tps"], COLORS["understudy"]),
            (
                f"Understudy\n{llama['threads']}t, {n} conc",
                s["understudy"]["concurrent_tps"],
                COLORS["understudy"],
            ),
        ]
        for name in llama_servers(llama):
            threads = name.removeprefix("llama_cpp_")
            entries += [
                (f"llama-cpp\n{threads}, 1 req", s[name]["single_tps"], COLORS["llama_cpp"]),
                (f"llama-cpp\n{threads}, {n} conc", s[name]["concurrent_tps"], COLORS["llama_cpp"]),
            ]
        panels.append((entries, "Understudy's backend (fp32) vs llama-cpp-python's server (Q4_1)"))
    if not panels:
        return []
    widths = [max(3, len(entries)) for entries, _ in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.9 * sum(widths), 4), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, (entries, title) in zip(axes[0], panels, strict=True):
        bars(ax, entries, title)
    fig.suptitle("local model: SmolLM2-135M-Instruct, greedy")
    return [save(fig, docs, "local_tokens.png")]


# --- sections ------------------------------------------------------------------------------


def machine_section(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    rows = [
        ["CPU", f"{m['cpu_model']}, {m['cores']} cores"],
        ["memory", f"{m['ram_gib']:.1f} GiB"],
        ["OS", m["os"]],
        ["Python", m["python"]],
        [
            "load average (1 min) at start / end",
            f"{m['load_start']:.2f} / {m.get('load_end', float('nan')):.2f}",
        ],
        ["Understudy's stack", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
        ["LiteLLM proxy (own venv)", m.get("litellm_proxy") or "not installed in this run"],
        ["llama-cpp-python (own venv)", m.get("llama_cpp") or "not built in this run"],
    ]
    return table(["", ""], rows)


def proxy_section(meta: dict[str, Any], results: Path, docs: Path, checks: list[list[str]]) -> list[str]:
    lines = ["## 1. Proxy: Understudy vs LiteLLM's proxy vs direct", ""]
    proxy = loaded(meta, results, "proxy", "proxy_compare.json")
    if proxy is None:
        return lines + not_run(meta, "proxy")
    s = proxy["settings"]
    litellm_on = "litellm" in proxy["summary"]
    lines += [
        "One fake upstream (`gateway.demo.fakecloud`, its own process, answers at once) behind each target; "
        "the load generator (`bench/loadgen.py`, aiohttp, a fresh process per cell) sends the same small chat "
        f"request, non-streamed and streamed, {s['requests']} requests per cell to direct and Understudy"
        + (f", {s['litellm_requests']} to LiteLLM" if litellm_on else "")
        + f" (at least {s.get('min_waves', 3)}x the concurrency)"
        + f". Targets interleaved cell by cell (direct, Understudy, LiteLLM, ...), {s['rounds']} rounds, "
        "median of rounds; *added* latency is target minus direct within a round, then the median. "
        "One worker process each: Understudy runs one uvicorn process (its only mode); LiteLLM with "
        "`--num_workers 1`. Understudy: `understudy serve`, local backend off, request logging on "
        "(SQLite in a temp data dir, durable before the last byte). LiteLLM: its CLI with a config "
        "pointing `gpt-4o-mini` at the fake upstream (`openai/gpt-4o-mini` + `api_base`), a master key "
        "(1.106 refuses to start without one), no database, default logging and callbacks, "
        "`LITELLM_LOCAL_MODEL_COST_MAP=True`. Client, upstream and proxy share the machine's cores.",
        "",
    ]
    lines += reproduce(meta, "proxy")
    lines += proxy_setup(proxy)
    summary = proxy["summary"]
    rows = []
    for c in [str(c) for c in s["concurrency"]]:
        for target, by_mode in summary.items():
            x = by_mode["chat"][c]
            rows.append(
                [c, LABELS[target], fmt(x["p50_ms"]), fmt(x["p99_ms"]), fmt(x.get("added_p50_ms")),
                 fmt(x.get("added_p99_ms")), fmt(x["rps"], 0), fmt(x["cpu_ms_per_request"]),
                 str(x["requests"]), str(x["errors"])]
            )  # fmt: skip
    lines += ["Non-streamed:", ""]
    lines += table(
        ["concurrency", "target", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "req/s",
         "CPU ms/req (target)", "requests", "errors"], rows
    )  # fmt: skip
    rows = []
    for c in [str(c) for c in s["concurrency"]]:
        for target, by_mode in summary.items():
            x = by_mode["stream"][c]
            rows.append(
                [c, LABELS[target], fmt(x["ttft_p50_ms"]), fmt(x["ttft_p99_ms"]), fmt(x.get("added_ttft_p50_ms")),
                 fmt(x["p50_ms"]), fmt(x["rps"], 0), fmt(x["cpu_ms_per_request"]), str(x["errors"])]
            )  # fmt: skip
    lines += ["Streamed (time to first token = first chunk with content):", ""]
    lines += table(
        ["concurrency", "target", "TTFT p50 ms", "TTFT p99 ms", "added TTFT p50 ms", "whole stream p50 ms",
         "req/s", "CPU ms/req (target)", "errors"], rows
    )  # fmt: skip
    rows = [
        [LABELS[n], fmt(m["after_warmup"]["rss_mib"], 0), fmt(m["end"]["rss_mib"], 0),
         fmt(m["end"]["peak_rss_mib"], 0), str(m["end"]["processes"])]
        for n, m in proxy["memory"].items()
    ]  # fmt: skip
    lines += ["Memory (process tree of each proxy; peak = sum of VmHWM at the end of the run):", ""]
    lines += table(["proxy", "RSS after warm-up MiB", "RSS at end MiB", "peak RSS MiB", "processes"], rows)
    lines += cpu_note(proxy)
    lines += [*proxy_plots(proxy, docs), ""]
    for check in proxy["targets"]:
        checks.append([check["target"], check["value"], "met" if check["met"] else "**not met**"])
    if not litellm_on:
        lines += ["LiteLLM was skipped in this run, so its three targets were not evaluated.", ""]
    return lines


def proxy_setup(proxy: dict[str, Any]) -> list[str]:
    """The targets' commands and configs (temp paths as they were in this run)."""
    lines = ["<details><summary>Commands and configs of this run</summary>", ""]
    for name, command in proxy.get("commands", {}).items():
        lines += [f"{LABELS[name]}: `{' '.join(command)}`", ""]
        if name in proxy.get("configs", {}):
            lines += ["```yaml", proxy["configs"][name].rstrip(), "```", ""]
    return [*lines, "</details>", ""]


def cpu_note(proxy: dict[str, Any]) -> list[str]:
    """Why the throughputs differ: at concurrency >= 8 each proxy is CPU-bound."""
    chat = proxy["summary"]
    if "litellm" not in chat or "32" not in chat["understudy"]["chat"]:
        return []
    us, ll = chat["understudy"]["chat"]["32"], chat["litellm"]["chat"]["32"]
    return [
        f"At concurrency 32 Understudy's process spends {us['cpu_ms_per_request']:.2f} ms of CPU per "
        f"request and LiteLLM's {ll['cpu_ms_per_request']:.2f} ms "
        f"({ll['cpu_ms_per_request'] / us['cpu_ms_per_request']:.0f}x): a single-process proxy on these "
        "cores is CPU-bound from a few concurrent requests on, so its req/s is about 1000 / that figure, "
        "less what the client and the upstream take from the same two cores.",
        "",
    ]


def local_section(meta: dict[str, Any], results: Path, docs: Path, checks: list[list[str]]) -> list[str]:
    lines = ["## 2. Local model server", ""]
    local = loaded(meta, results, "local", "local_backend.json")
    llama = loaded(meta, results, "llamacpp", "llamacpp.json")
    if local is not None:
        local["median"] = {
            k: sorted(local[k])[len(local[k]) // 2]
            for k in ("direct_tps", "server_single_tps", "server_concurrent_tps")
        }
        local["concurrency"] = meta["steps"]["local"].get("concurrency", 8)
        med = local["median"]
        lines += [
            f"`bench/local_backend.py`: the bundled SmolLM2-135M-Instruct (fp32 torch, {local['torch_threads']} "
            f"threads), {local['tokens_per_request']} tokens per request (greedy, `ignore_eos`), "
            f"{local['rounds']} rounds, median; each round runs `model.generate` in-process, then one stream "
            "through the server, then concurrent streams.",
            "",
        ]
        lines += reproduce(meta, "local")
        lines += table(
            ["", "tokens/s", "ratio"],
            [
                ["`model.generate`, direct", fmt(med["direct_tps"], 1), ""],
                ["server, 1 stream", fmt(med["server_single_tps"], 1), f"{local['server_vs_direct']:.0%} of direct"],
                [f"server, {local['concurrency']} concurrent", fmt(med["server_concurrent_tps"], 1),
                 f"{local['concurrent_vs_single']:.2f}x one stream"],
            ],
        )  # fmt: skip
        lines += [
            "Per round (direct / 1 stream / concurrent): "
            + "; ".join(
                f"{d:.1f} / {o:.1f} / {c:.1f}"
                for d, o, c in zip(
                    local["direct_tps"],
                    local["server_single_tps"],
                    local["server_concurrent_tps"],
                    strict=True,
                )
            ),
            "",
        ]
        checks.append(["local server, 1 stream >= 90% of `model.generate`", f"{local['server_vs_direct']:.0%}",
                       "met" if local["server_vs_direct"] >= 0.9 else "**not met**"])  # fmt: skip
        checks.append(["local server, 8 concurrent >= 3x one stream", f"{local['concurrent_vs_single']:.2f}x",
                       "met" if local["concurrent_vs_single"] >= 3 else "**not met**"])  # fmt: skip
    else:
        lines += ["`bench/local_backend.py`:", "", *not_run(meta, "local")]
    lines += ["### llama-cpp-python's server", ""]
    if llama is None:
        lines += not_run(meta, "llamacpp")
    elif not llama.get("built"):
        lines += [
            "llama-cpp-python did not build in this run, so there is no llama.cpp comparison:",
            "",
            "```",
            llama.get("error", "").strip()[-3000:],
            "```",
            "",
        ]
    else:
        s, names = llama["summary"], ["understudy", *llama_servers(llama)]
        threads = ", ".join(name.removeprefix("llama_cpp_").removesuffix("t") for name in names[1:])
        lines += [
            f"`bench/llamacpp.py`: llama-cpp-python {llama['llama_cpp_version']} (built from source in its own "
            "venv, without ggml's AMX kernels, which crash on this VM) serving the same GGUF file as it is (Q4_1), "
            f"with {threads} threads (the cores, and its own default of half the cores), against Understudy's "
            f"backend (the same weights dequantized to fp32 torch, {llama['threads']} threads), all up at once, "
            f"identical greedy chat requests of up to {llama['tokens']} tokens (non-streamed: every server "
            f"reports exact token counts), one at a time and {llama['concurrency']} at once (llama-cpp-python's "
            f"server runs them one after another: `--interrupt_requests False`), {llama['rounds']} interleaved "
            "rounds, median.",
            "",
        ]
        lines += reproduce(meta, "llamacpp")
        rows = [
            [server_label(n) if n != "understudy" else f"Understudy's backend, {llama['threads']} threads",
             fmt(s[n]["single_tps"], 1), fmt(s[n]["concurrent_tps"], 1),
             f"{s[n]['concurrent_vs_single']:.2f}x", fmt(llama["memory"][n]["rss_mib"], 0)]
            for n in names
        ]  # fmt: skip
        lines += table(
            [
                "server",
                "1 request tok/s",
                f"{llama['concurrency']} concurrent tok/s",
                "concurrent / 1",
                "RSS MiB",
            ],
            rows,
        )
        raw = llama["rounds_raw"]
        lines += ["Per round, 1 request / concurrent, tok/s:", ""]
        backend = "Understudy's backend"
        lines += [
            f"- {backend if n == 'understudy' else server_label(n)}: "
            + "; ".join(
                f"{a:.1f} / {b:.1f}"
                for a, b in zip(raw[n]["single_tps"], raw[n]["concurrent_tps"], strict=True)
            )
            for n in names
        ]
        lines.append("")
        us = s["understudy"]
        lines += [
            f"Understudy's backend / {server_label(n)}: {us[f'single_tps_vs_{n}']:.2f}x one request at a time, "
            f"{us[f'concurrent_tps_vs_{n}']:.2f}x at {llama['concurrency']} concurrent."
            for n in names[1:]
        ]
        lines.append("")
    lines += [*local_plot(local, llama, docs), ""]
    return lines


def precision_median(values: dict[str, Any], key: str) -> float:
    """A mode's median tok/s (`key`: single or concurrent), as written, else from its rounds."""
    median = values.get(f"{key}_median")
    return float(median) if median is not None else statistics.median(values[f"{key}_tps"])


def precision_ratio(values: dict[str, Any], base: dict[str, Any] | None, key: str) -> float | None:
    """A mode's ratio to fp32: its "2.10x" as written, else the median of within-round ratios."""
    try:
        return float(str(values.get(f"{key}_vs_fp32", "")).removesuffix("x"))
    except ValueError:
        pass
    if base is None:
        return None
    pairs = zip(values[f"{key}_tps"], base[f"{key}_tps"], strict=True)
    ratios = [a / b for a, b in pairs if b]
    return statistics.median(ratios) if ratios else None


def ratio_text(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def precision_table(run: dict[str, Any], concurrency: int) -> list[str]:
    modes, base = run["modes"], run["modes"].get("fp32")
    rows = [
        [mode, v["weights"], v["activations"], fmt(precision_median(v, "single"), 2),
         ratio_text(precision_ratio(v, base, "single")), fmt(precision_median(v, "concurrent"), 2),
         ratio_text(precision_ratio(v, base, "concurrent"))]
        for mode, v in modes.items()
    ]  # fmt: skip
    lines = table(
        ["mode", "weights", "activations", "1 stream tok/s (median)", "vs fp32",
         f"{concurrency} concurrent tok/s (median)", "vs fp32"], rows
    )  # fmt: skip
    per_round = "; ".join(
        f"{mode} " + ", ".join(
            f"{a:.2f} / {b:.2f}" for a, b in zip(v["single_tps"], v["concurrent_tps"], strict=True)
        )
        for mode, v in modes.items()
    )  # fmt: skip
    return [*lines, f"Per round, 1 stream / {concurrency} concurrent, tok/s: {per_round}.", ""]


def precision_checks(runs: list[dict[str, Any]], checks: list[list[str]]) -> None:
    """Targets: a faster mode than fp32 on the bundled model; TinyLlama-shaped at >= 10 tok/s."""
    first = runs[0]["modes"]
    ratios = {
        mode: precision_ratio(v, first.get("fp32"), "single") for mode, v in first.items() if mode != "fp32"
    }
    known = {mode: r for mode, r in ratios.items() if r is not None}
    if known:
        mode = max(known, key=lambda m: known[m])
        checks.append(["bf16 or int8/int4 one stream ≥ 2x fp32 (bundled model)", f"{known[mode]:.2f}x ({mode})",
                       "met" if known[mode] >= 2.0 else "**not met**"])  # fmt: skip
    if len(runs) > 1:
        medians = {mode: precision_median(v, "single") for mode, v in runs[1]["modes"].items()}
        mode = max(medians, key=lambda m: medians[m])
        checks.append(["TinyLlama-1.1B-shaped one stream ≥ 10 tok/s", f"{medians[mode]:.2f} tok/s ({mode})",
                       "met" if medians[mode] >= 10 else "**not met**"])  # fmt: skip


def precision_section(meta: dict[str, Any], results: Path, checks: list[list[str]]) -> list[str]:
    lines = ["## 3. Local precision", ""]
    r = loaded(meta, results, "precision", "local_precision.json")
    if r is None:
        return lines + not_run(meta, "precision")
    concurrency = meta["steps"]["precision"].get("concurrency", 8)
    threads = (
        f"{r['threads']} torch thread{'s' if r['threads'] != 1 else ''}"
        if r.get("threads")
        else "torch's threads"
    )
    lines += [
        "`bench/local_backend.py --precision`: one backend server per precision mode, all up at once "
        f"({threads} each), the same greedy streamed chat requests (`ignore_eos`), one stream then "
        f"{concurrency} concurrent, the modes alternating within each round; medians of rounds, and "
        "ratios to fp32 taken within a round, then the median. On the bundled model, then on a "
        "randomly initialised model with TinyLlama-1.1B's sizes and the bundled tokenizer (3% more "
        "weights than TinyLlama: a conservative speed figure).",
        "",
    ]
    lines += reproduce(meta, "precision")
    for run in r["runs"]:
        lines += [
            f"{Path(run['model']).name}: {run['tokens_per_request']} tokens per request, {run['rounds']} "
            f"round{'s' if run['rounds'] != 1 else ''}, load average {run['load_average'][0]:.2f}, "
            f"{run['seconds']:.0f} s:",
            "",
        ]
        lines += precision_table(run, concurrency)
    if r["runs"]:
        precision_checks(r["runs"], checks)
    return lines


def train_section(meta: dict[str, Any], results: Path, checks: list[list[str]]) -> list[str]:
    lines = ["## 4. Training", ""]
    train = loaded(meta, results, "train", "train.json")
    if train is None:
        return lines + not_run(meta, "train")
    lines += [
        f"`bench/train.py`: LoRA on {train['model']}, batch {train['batch']}, sequence {train['seq']}; the "
        "trainer (HF Trainer + our collator and progress callback) against a plain peft + torch loop on the "
        "same data and optimizer. Side by side = both arms at once, one thread each, only steps inside the "
        "window where both measure (the ratio to trust)"
        + ("; sequential = one at a time, all threads." if "sequential" in train else "."),
        "",
    ]
    lines += reproduce(meta, "train")
    rows = []
    for mode in ("side_by_side", "sequential"):
        if mode not in train:
            continue
        for arm in ("trainer", "plain_loop"):
            x = train[mode][arm]
            rows.append(
                [mode.replace("_", " "), arm.replace("_", " "), str(x.get("measured_steps", 0)),
                 fmt(x.get("seconds_per_step"), 2), fmt(x.get("cpu_seconds_per_step"), 2),
                 fmt(x.get("samples_per_second"), 3), fmt(x.get("peak_rss_mib"), 0)]
            )  # fmt: skip
        ratio = train[mode].get("trainer_over_plain")
        if ratio is not None and mode == "side_by_side":
            checks.append(["trainer s/step within 10% of a plain peft loop (side by side)", f"{ratio:.3f}x",
                           "met" if ratio <= 1.1 else "**not met**"])  # fmt: skip
    lines += table(["mode", "arm", "steps", "s/step", "CPU s/step", "samples/s", "peak RSS MiB"], rows)
    for mode in ("side_by_side", "sequential"):
        if mode in train and "trainer_over_plain" in train[mode]:
            lines.append(
                f"- {mode.replace('_', ' ')}: trainer / plain loop = {train[mode]['trainer_over_plain']:.3f}x"
            )
    return [*lines, ""]


def overload_section(meta: dict[str, Any], results: Path, checks: list[list[str]]) -> list[str]:
    lines = ["## 5. Overload", ""]
    r = loaded(meta, results, "overload", "overload.json")
    if r is None:
        return lines + not_run(meta, "overload")
    statuses = r["overload_statuses"]
    other = sum(v for k, v in statuses.items() if k not in ("200", "429", "503"))
    ratio = r["overload_admitted_p99_ms"] / r["unloaded_p99_ms"]
    lines += [
        f"`bench/overload.py`: {r['offered_rps']:.0f} req/s offered open-loop for {r['seconds']:.0f} s to a "
        f"gateway whose capacity is {r['capacity_rps']:.0f} req/s (fake upstream answering in 200 ms, "
        "`max_concurrency: 8, max_queue: 4`, a client key at 1.5x capacity in rpm).",
        "",
    ]
    lines += reproduce(meta, "overload")
    lines += table(
        ["answered 200", "429", "503", "other / hung", "admitted req/s", "no Retry-After",
         "admitted p99 ms", "unloaded p99 ms", "p99 after", "RSS before → after MiB"],
        [[str(statuses.get("200", 0)), str(statuses.get("429", 0)), str(statuses.get("503", 0)), str(other),
          fmt(r["admitted_rps"], 1), str(r["refusals_without_retry_after"]), fmt(r["overload_admitted_p99_ms"], 0),
          fmt(r["unloaded_p99_ms"], 0), fmt(r["recovered_p99_ms"], 0),
          f"{r['gateway_rss_mib_before'].get('VmRSS', 0):.0f} → {r['gateway_rss_mib_after'].get('VmRSS', 0):.0f}"]],
    )  # fmt: skip
    checks.append(["overload: admitted p99 <= 2x unloaded, no hung request", f"{ratio:.2f}x, {other} other",
                   "met" if ratio <= 2 and other == 0 else "**not met**"])  # fmt: skip
    return lines


def adaptive_section(meta: dict[str, Any], results: Path) -> list[str]:
    lines = ["## 6. Adaptive cycle", ""]
    r = loaded(meta, results, "adaptive", "adaptive.json")
    if r is None:
        return lines + not_run(meta, "adaptive")
    lines += reproduce(meta, "adaptive")
    rows = [[key.replace("_", " "), str(value)] for key, value in r.items()]
    return lines + table(["", ""], rows)


def steps_section(meta: dict[str, Any]) -> list[str]:
    rows = [
        [name, info["status"], fmt(info.get("seconds"), 0), f"`{info.get('command', '')}`"]
        for name, info in meta["steps"].items()
    ]
    return ["## Run log", "", *table(["step", "status", "seconds", "command"], rows)]


def render(results: Path = RESULTS, docs: Path = REPO / "docs" / "BENCHMARKS.md") -> str:
    meta = json.loads((results / "run.json").read_text())
    checks: list[list[str]] = []
    body: list[str] = []
    body += proxy_section(meta, results, docs, checks)
    body += local_section(meta, results, docs, checks)
    body += precision_section(meta, results, checks)
    body += train_section(meta, results, checks)
    body += overload_section(meta, results, checks)
    if "adaptive" in meta["steps"]:
        body += adaptive_section(meta, results)
    mode = (
        "`--quick`: a smoke run with tiny counts, its figures are not to be trusted"
        if meta["quick"]
        else "full run"
    )
    head = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}` on {meta['started']} ({mode}) from commit "
        f"{meta.get('code', 'unknown')}, every figure measured in this "
        f"one run on this one machine; took {meta.get('seconds', 0) / 60:.1f} min. "
        "Re-run everything with `make bench`; each section names the command that reproduces it alone.",
        "",
        "This machine is shared with other work (see the load average), so absolute figures are noisy; "
        "comparisons are taken within interleaved rounds so that noise hits both sides alike.",
        "",
        *machine_section(meta),
        "## Targets",
        "",
        *table(["target", "measured", ""], checks or [["(none evaluated in this run)", "", ""]]),
        "",
        "Where the gateway's time goes, and what the profile changed: [PROFILING.md](PROFILING.md).",
        "",
    ]
    text = "\n".join(head + body + steps_section(meta)).rstrip() + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    render(args.results, args.docs)
    print(f"wrote {args.docs}")


if __name__ == "__main__":
    main()
