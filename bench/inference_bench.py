"""Local-model benchmarks through the real server (gunicorn + gevent, one worker).

- tokens/s of SmolLM2 streamed through the API vs llama-cpp-python called directly in one process;
- embeddings/s of ~110-token passages at 1 and 32 concurrent clients, micro-batching on and off;
- /healthz latency while 4 generations run (the hub must stay responsive), against idle.

    python -m bench.inference_bench [--quick]

Writes bench/results/inference.json and prints a Markdown table. Each figure is measured in the
same run as the figure it is compared with; absolute numbers on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CATALOGUE = ROOT / "bench" / "inference_models.yaml"
PROMPT = [
    {"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Migrates DATABASE_URL and prints a key of a `bench` tenant with limits no benchmark reaches.
SETUP_SCRIPT = (
    "from flask_migrate import upgrade\n"
    "from app import create_app\n"
    "from app.extensions import db\n"
    "from app.identity.accounts import create_tenant\n"
    "from app.identity.apikeys import issue_key\n"
    "app = create_app()\n"
    "with app.app_context():\n"
    "    upgrade()\n"
    "    tenant = create_tenant('bench', rate_limit='1000000/minute', key_rate_limit='1000000/minute')\n"
    "    print(issue_key(tenant, 'bench', ['inference:invoke', 'models:read'])[1])\n"
)


def prepare_database(workdir: Path) -> tuple[str, str]:
    """A migrated SQLite database and an API key, made in a subprocess like `make run` would."""
    url = f"sqlite:///{workdir / 'bench.db'}"
    env = {**os.environ, "DATABASE_URL": url, "APP_ENV": "development", "LOG_LEVEL": "WARNING"}
    out = subprocess.run(
        [sys.executable, "-c", SETUP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return url, out.stdout.strip().splitlines()[-1]


@contextmanager
def gateway(workdir: Path, db_url: str, **env: str):
    port = free_port()
    log = open(workdir / f"gunicorn-{port}.log", "wb")  # noqa: SIM115 - closed below
    full_env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": db_url,
        "MODELS_CONFIG": str(CATALOGUE),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-{port}"),
        "HF_HUB_OFFLINE": "1",
        "LOG_LEVEL": "WARNING",
        **env,
    }
    full_env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise RuntimeError((workdir / f"gunicorn-{port}.log").read_text())
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(45)  # gunicorn's graceful_timeout is 30 s
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def stream_tokens(url: str, key: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds from sending to the last token) for one streamed chat."""
    body = {
        "model": "smollm2",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.8,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    tokens = 0
    with requests.post(
        url + "/v1/chat/completions",
        json=body,
        stream=True,
        timeout=300,
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith(b"data: {") and b'"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - started


def direct_tokens(max_tokens: int, runs: int) -> list[float]:
    """llama-cpp-python in this process, the same model file, prompt and sampling."""
    from llama_cpp import Llama

    from app.inference.backends.llama_cpp import default_model_path

    llm = Llama(
        model_path=str(default_model_path()),
        n_ctx=2048,
        n_threads=int(os.environ.get("LLAMA_THREADS", 2)),
        verbose=False,
    )
    rates = []
    for run in range(runs + 1):
        started = time.perf_counter()
        tokens = 0
        for chunk in llm.create_chat_completion(
            messages=PROMPT, max_tokens=max_tokens, stream=True, temperature=0.8
        ):
            if chunk["choices"][0]["delta"].get("content"):
                tokens += 1
        if run:  # the first run warms the caches, as the server's first request does
            rates.append(tokens / (time.perf_counter() - started))
    return rates


# A retrieval-sized chunk (~110 tokens), varied per request: with three-word inputs the forward pass
# is nearly free and the figure measures HTTP overhead, which batching cannot reduce.
CHUNK = (
    "Client {i} request {n}: the gateway routes each call to a model version, checks the tenant's "
    "policy, reserves tokens from its quota and writes an audit record. Operators tune the number of "
    "workers and greenlets, watch the Prometheus metrics and probe readiness before sending traffic. "
    "Embedding models turn passages like this one into vectors for semantic search over documents."
)


def embeddings_rate(url: str, key: str, clients: int, seconds: float) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * clients

    def client(i: int) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            n = 0
            while time.monotonic() < stop:
                resp = session.post(
                    url + "/v1/embeddings",
                    json={"model": "minilm", "input": CHUNK.format(i=i, n=n)},
                    timeout=60,
                )
                resp.raise_for_status()
                n += 1
            counts[i] = n

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return sum(counts) / (time.monotonic() - started)


def healthz_latency(url: str, seconds: float) -> list[float]:
    samples = []
    stop = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < stop:
            started = time.perf_counter()
            session.get(url + "/healthz", timeout=10).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": round(percentile(samples, 50), 2),
        "p99_ms": round(percentile(samples, 99), 2),
        "max_ms": round(max(samples), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    args = parser.parse_args()
    runs, max_tokens, seconds = (1, 64, 3.0) if args.quick else (3, 256, 10.0)
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    db_url, key = prepare_database(workdir)
    results: dict[str, object] = {
        "command": "python -m bench.inference_bench" + (" --quick" if args.quick else ""),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }

    direct = direct_tokens(max_tokens, runs)
    with gateway(workdir, db_url) as url:
        stream_tokens(url, key, 16)  # warm-up
        api = [n / s for n, s in (stream_tokens(url, key, max_tokens) for _ in range(runs))]
    results["tokens_per_s"] = {
        "direct": round(statistics.median(direct), 1),
        "api": round(statistics.median(api), 1),
        "api_over_direct": round(statistics.median(api) / statistics.median(direct), 3),
    }

    rates: dict[str, float] = {}
    for batching, batch in (("batching", "32"), ("no_batching", "1")):
        with gateway(workdir, db_url, MINILM_BATCH=batch) as url:
            embeddings_rate(url, key, 4, 1.0)  # warm-up
            for clients in (1, 32):
                rates[f"{batching}_{clients}_clients"] = round(embeddings_rate(url, key, clients, seconds), 1)
    rates["batching_gain_at_32"] = round(rates["batching_32_clients"] / rates["no_batching_32_clients"], 2)
    results["embeddings_per_s"] = rates

    with gateway(workdir, db_url, SMOLLM_INSTANCES="4", LLAMA_THREADS="1") as url:
        idle = healthz_latency(url, seconds / 2)
        stop = threading.Event()

        def generate() -> None:
            while not stop.is_set():
                stream_tokens(url, key, 128)

        threads = [threading.Thread(target=generate, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # all four generations under way
        busy = healthz_latency(url, seconds)
        stop.set()
        for thread in threads:
            thread.join(120)
    results["healthz_ms"] = {"idle": summary(idle), "during_4_generations": summary(busy)}

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(results, indent=2) + "\n")
    t, e, h = results["tokens_per_s"], results["embeddings_per_s"], results["healthz_ms"]
    print(f"""
| measure | value |
|---|---|
| SmolLM2 tokens/s, direct llama-cpp-python | {t["direct"]} |
| SmolLM2 tokens/s, through the API (SSE) | {t["api"]} ({t["api_over_direct"]:.0%} of direct) |
| embeddings/s, 1 client, batching / none | {e["batching_1_clients"]} / {e["no_batching_1_clients"]} |
| embeddings/s, 32 clients, batching / none | {e["batching_32_clients"]} / {e["no_batching_32_clients"]} \
({e["batching_gain_at_32"]}x) |
| /healthz p50 / p99 / max ms, idle | {h["idle"]["p50_ms"]} / {h["idle"]["p99_ms"]} / {h["idle"]["max_ms"]} |
| /healthz p50 / p99 / max ms, 4 generations | {h["during_4_generations"]["p50_ms"]} / \
{h["during_4_generations"]["p99_ms"]} / {h["during_4_generations"]["max_ms"]} |
""")


if __name__ == "__main__":
    main()
