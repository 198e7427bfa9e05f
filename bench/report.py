"""REPORT.md and the plots, from the scenario JSON files a run wrote.

The report only reads ``<scenario>.json``, so it can be regenerated (``python -m bench.report
[dir]``) without measuring again. Every table names the run that produced it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# The light twins run auth, rate limit, validation and plain audit rows; the full twins also the
# PII policy, token quota, hash-chained audit and metrics that ours runs (bench/fastapi_twin).
SYSTEMS = ("ours", "twin-httpx", "twin-aiohttp", "twin-full-httpx", "twin-full-aiohttp", "litellm", "direct")
PEERS = ("twin-httpx", "twin-aiohttp", "twin-full-httpx", "twin-full-aiohttp", "litellm", "direct")
SCENARIO_ORDER = (
    "overhead",
    "streams",
    "fanout",
    "chain",
    "saturation",
    "overload",
    "concurrency250",
    "profile",
)
PROFILE_ROWS = 12
Doc = Mapping[str, Any]


def load(out: Path) -> dict[str, Doc]:
    docs = {}
    for name in SCENARIO_ORDER:
        path = out / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    return docs


def fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        text = f"{value:,.{digits}f}"
        return f"{text} {unit}".strip()
    return str(value)


def ratio(ours: float | None, peer: float | None) -> str:
    if ours is None or peer is None or peer == 0:
        return "-"
    return f"{ours / peer:.2f}x"


def _ok(doc: Doc, system: str) -> Mapping[str, Any] | None:
    entry = doc.get("systems", {}).get(system)
    return entry if entry and entry.get("status") == "ok" else None


def _why(doc: Doc, system: str) -> str:
    entry = doc.get("systems", {}).get(system)
    if entry is None:
        return "not run"
    if entry["status"] == "not_applicable":
        return "n/a"
    return "failed"


def _cell(doc: Doc | None, system: str, render: Callable[[Mapping[str, Any]], str]) -> str:
    if doc is None:
        return "not run"
    entry = _ok(doc, system)
    return render(entry) if entry else _why(doc, system)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _systems_in(doc: Doc) -> list[str]:
    return [s for s in SYSTEMS if s in doc.get("systems", {})]


# --- metric extractors (None when a system has no figure) ------------------------------------------


def timeouts(run: Mapping[str, Any]) -> int:
    return int(run["errors"].get("timeout", 0))


def concurrency_cell(entry: Mapping[str, Any]) -> str:
    run = entry["run"]
    other = run["error_count"] - timeouts(run)
    return (
        f"{timeouts(run)} timeouts, {other} other errors in {run['sent']:,} requests; "
        f"p99 {fmt(run['latency_ms']['p99'], 'ms')}"
    )


def streams_cell(entry: Mapping[str, Any]) -> str:
    run = entry["run"]
    return (
        f"{run['ok']:,} of {entry['target_streams']:,} streams ok, peak {run['peak_open_streams']:,} open, "
        f"{run['error_count']:,} errors"
    )


def saturation_cell(entry: Mapping[str, Any]) -> str:
    if entry["limited_by_load_generator"]:
        return f"at least {entry['max_sustained_rps']:,} req/s (the load generator could not go higher)"
    return f"{entry['max_sustained_rps']:,} req/s"


def chain_cell(entry: Mapping[str, Any]) -> str:
    plans = entry["plans"]
    independent, rag = plans["independent"], plans["rag"]
    return (
        f"all 4 at once: p50 {fmt(independent['run']['latency_ms']['p50'], 'ms')} "
        f"(floor {independent['floor_ms']:.0f}); auth‖lookup→LLM→store: p50 "
        f"{fmt(rag['run']['latency_ms']['p50'], 'ms')} (floor {rag['floor_ms']:.0f})"
    )


# --- sections --------------------------------------------------------------------------------------


def headline(docs: Mapping[str, Doc]) -> list[str]:
    claims = [
        ("Flask times out under 250 concurrent AI requests", "concurrency250", concurrency_cell),
        (
            "Gunicorn caps Flask at ~3,500 concurrent connections; one FastAPI worker holds 40,000+",
            "streams",
            streams_cell,
        ),
        ("Flask does 2-3k req/s, FastAPI 15-20k req/s", "saturation", saturation_cell),
        ("A 4 x 80 ms I/O chain takes ~320 ms on Flask, ~90 ms on FastAPI", "chain", chain_cell),
    ]
    rows = [
        [
            claim,
            *(
                _cell(docs.get(scenario), s, render)
                for s in (
                    "ours",
                    "twin-httpx",
                    "twin-aiohttp",
                    "twin-full-httpx",
                    "twin-full-aiohttp",
                    "litellm",
                )
            ),
        ]
        for claim, scenario, render in claims
    ]
    return _table(
        [
            "seed claim",
            "ours (Flask+gevent, fully governed)",
            "twin (FastAPI+httpx)",
            "twin (FastAPI+aiohttp)",
            "feature-equal twin (FastAPI+httpx)",
            "feature-equal twin (FastAPI+aiohttp)",
            "LiteLLM",
        ],
        rows,
    )


def _ratios(metrics: list[tuple[str, Callable[[Mapping[str, Any]], float | None]]], doc: Doc) -> list[str]:
    """Rows of ours / each peer for each metric (the metric's name says which way is better)."""
    rows = []
    for label, metric in metrics:
        ours_entry = _ok(doc, "ours")
        ours = metric(ours_entry) if ours_entry else None
        cells = []
        for peer in PEERS:
            entry = _ok(doc, peer)
            cells.append(ratio(ours, metric(entry) if entry else None))
        rows.append([label, *cells])
    return _table(["metric", *(f"ours / {p}" for p in PEERS)], rows)


def overhead_section(doc: Doc) -> list[str]:
    lines = []
    direct = _ok(doc, "direct")
    rates = list(next((e["runs"] for e in doc["systems"].values() if e.get("status") == "ok"), {}))
    for rate in rates:
        rows = []
        for system in _systems_in(doc):
            entry = _ok(doc, system)
            if not entry:
                rows.append([system, _why(doc, system), *["-"] * 6])
                continue
            run = entry["runs"][rate]
            lat = run["latency_ms"]
            base = direct["runs"][rate]["latency_ms"] if direct else None
            added = [
                fmt(lat[q] - base[q], "ms", 1) if base and lat[q] is not None and base[q] is not None else "-"
                for q in ("p50", "p95", "p99")
            ]
            cpu = run["cpu"]["cpu_seconds"].get("system_under_test")
            per_request = cpu / run["ok"] * 1000 if cpu is not None and run["ok"] else None
            rows.append(
                [
                    system,
                    f"{fmt(lat['p50'], 'ms', 1)} / {fmt(lat['p99'], 'ms', 1)}",
                    *added,
                    f"{run['error_count']:,}",
                    fmt(per_request, "ms", 2),
                    fmt(run["throughput_rps"], "", 0),
                ]
            )
        lines += [f"**{rate} req/s**", ""]
        lines += _table(
            [
                "system",
                "p50 / p99",
                "added p50",
                "added p95",
                "added p99",
                "errors",
                "server CPU per request",
                "ok/s",
            ],
            rows,
        )
        lines.append("")

    def p99_at(rate: str) -> Callable[[Mapping[str, Any]], float | None]:
        def metric(entry: Mapping[str, Any]) -> float | None:
            return entry["runs"][rate]["latency_ms"]["p99"]

        return metric

    lines += _ratios([(f"p99 at {rate} req/s (lower is better)", p99_at(rate)) for rate in rates], doc)
    return lines


def streams_section(doc: Doc) -> list[str]:
    rows = []
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            rows.append([system, _why(doc, system), *["-"] * 5])
            continue
        run = entry["run"]
        rows.append(
            [
                system,
                f"{run['ok']:,} / {entry['target_streams']:,}",
                f"{run['peak_open_streams']:,}",
                ", ".join(f"{k}: {v:,}" for k, v in run["errors"].items()) or "0",
                fmt(run["ttft_ms"]["p99"], "ms"),
                fmt(entry["peak_rss_mb"], "MiB"),
                fmt(entry["rss_per_open_stream_kb"], "KiB", 1),
            ]
        )
    lines = _table(
        ["system", "streams ok", "peak open", "errors", "TTFT p99", "peak RSS", "RSS per open stream"], rows
    )
    note = next((e.get("target_note") for e in doc["systems"].values() if e.get("target_note")), "")
    if note:
        lines += ["", f"Target {note}."]
    lines += [
        "",
        *_ratios(
            [
                ("streams ok (higher is better)", lambda e: e["run"]["ok"]),
                ("TTFT p99 (lower is better)", lambda e: e["run"]["ttft_ms"]["p99"]),
                ("RSS per open stream (lower is better)", lambda e: e["rss_per_open_stream_kb"]),
            ],
            doc,
        ),
    ]
    return lines


def _latency_rows(
    doc: Doc, pick: Callable[[Mapping[str, Any]], Mapping[str, Any]], floor: float
) -> list[list[str]]:
    rows = []
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            rows.append([system, _why(doc, system), "-", "-", "-"])
            continue
        run = pick(entry)
        lat = run["latency_ms"]
        rows.append(
            [
                system,
                fmt(lat["p50"], "ms"),
                fmt(lat["p99"], "ms"),
                f"+{fmt(lat['p50'] - floor, 'ms')}" if lat["p50"] is not None else "-",
                f"{run['error_count']:,} / {run['sent']:,}",
            ]
        )
    return rows


def fanout_section(doc: Doc) -> list[str]:
    floor = next((e["floor_ms"] for e in doc["systems"].values() if e.get("status") == "ok"), 500.0)
    lines = _table(
        ["system", "p50", "p99", "p50 over the floor", "errors / requests"],
        _latency_rows(doc, lambda e: e["run"], floor),
    )
    lines += [
        "",
        *_ratios(
            [
                ("p50 (lower is better)", lambda e: e["run"]["latency_ms"]["p50"]),
                ("p99 (lower is better)", lambda e: e["run"]["latency_ms"]["p99"]),
            ],
            doc,
        ),
    ]
    return lines


def chain_section(doc: Doc) -> list[str]:
    lines: list[str] = []
    step = doc["params"]["chain_step_ms"]
    for plan, title, hops in (
        ("independent", "all four steps at once (the seeds' version)", 1),
        ("rag", "auth ‖ lookup, then LLM, then store (the real dependencies)", 3),
    ):
        floor = hops * step
        lines += [f"**{title}**: floor {floor:.0f} ms, sequential {4 * step:.0f} ms", ""]
        lines += _table(
            ["system", "p50", "p99", "p50 over the floor", "errors / requests"],
            _latency_rows(doc, lambda e, plan=plan: e["plans"][plan]["run"], floor),
        )
        lines.append("")
    lines += _ratios(
        [
            (
                f"{plan} p50 (lower is better)",
                lambda e, plan=plan: e["plans"][plan]["run"]["latency_ms"]["p50"],
            )
            for plan in ("independent", "rag")
        ],
        doc,
    )
    return lines


def saturation_section(doc: Doc) -> list[str]:
    rows = []
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            rows.append([system, _why(doc, system), "-", "-"])
            continue
        steps = ", ".join(
            f"{s['rate']}{'✓' if s['passed'] else '✗'}{' (lag)' if s['loadgen_lagging'] else ''}"
            for s in entry["steps"]
        )
        rows.append(
            [
                system,
                f"{entry['max_sustained_rps']:,}",
                fmt(entry["first_failing_rps"]),
                steps,
            ]
        )
    lines = _table(
        [
            "system",
            "max sustained req/s",
            "first failing req/s",
            "steps (req/s, ✓ = p99 ≤ 1 s and errors ≤ 0.1%)",
        ],
        rows,
    )
    lines += [
        "",
        *_ratios([("max sustained req/s (higher is better)", lambda e: e["max_sustained_rps"] or None)], doc),
    ]
    return lines


def overload_section(doc: Doc) -> list[str]:
    ladder_rows, sustained_rows = [], []
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            ladder_rows.append([system, _why(doc, system)])
            sustained_rows.append([system, _why(doc, system), *["-"] * 5])
            continue
        ladder_rows.append(
            [system, ", ".join(f"{s['offered_rps']:,} → {s['goodput_rps']:,.0f}" for s in entry["ladder"])]
        )
        sus = entry["sustained"]
        run = sus["run"]
        refusals = run.get("refusals")
        refused = (
            f"{refusals['count']:,} ({refusals['well_formed']:,} well formed), p99 "
            f"{fmt(refusals['latency_ms']['p99'], 'ms', 1)}"
            if refusals
            else "none"
        )
        other = run["error_count"] - (refusals["count"] if refusals else 0)
        health = sus["healthz"]
        sustained_rows.append(
            [
                system,
                f"{sus['offered_rps']:,}",
                f"{sus['goodput_rps']:,.0f} ({sus['goodput_share_of_reference']:.0%})",
                refused,
                f"{other:,}",
                fmt(health["latency_ms"]["p99"], "ms", 1) if health else "no /healthz",
            ]
        )
    sample = next((_ok(doc, s) for s in _systems_in(doc) if _ok(doc, s)), None)
    reference = (
        f"3 x {sample['sustained']['reference_rps']:,} req/s, {sample['sustained']['reference_source']}, for "
        f"{sample['sustained']['seconds']:g} s"
        if sample
        else ""
    )
    return [
        "Goodput (2xx per offered second) at each offered rate (req/s offered → 2xx/s):",
        "",
        *_table(["system", "offered → goodput"], ladder_rows),
        "",
        f"Sustained overload: {reference}. Goodput share is against that reference rate; a refusal "
        "is well formed with Retry-After and the OpenAI error object; its latency runs from the "
        "intended send time.",
        "",
        *_table(
            ["system", "offered req/s", "goodput 2xx/s", "503 refusals", "other errors", "/healthz p99"],
            sustained_rows,
        ),
    ]


def concurrency_section(doc: Doc) -> list[str]:
    rows = []
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            rows.append([system, _why(doc, system), *["-"] * 5])
            continue
        run = entry["run"]
        rows.append(
            [
                system,
                f"{run['ok']:,}",
                f"{timeouts(run):,}",
                f"{run['error_count'] - timeouts(run):,}",
                fmt(run["latency_ms"]["p50"], "ms"),
                fmt(run["latency_ms"]["p99"], "ms"),
                fmt(run["throughput_rps"], "req/s", 1),
            ]
        )
    lines = _table(["system", "ok", "timeouts", "other errors", "p50", "p99", "throughput"], rows)
    lines += [
        "",
        *_ratios(
            [
                ("throughput (higher is better)", lambda e: e["run"]["throughput_rps"]),
                ("p99 (lower is better)", lambda e: e["run"]["latency_ms"]["p99"]),
            ],
            doc,
        ),
    ]
    return lines


def profile_section(doc: Doc) -> list[str]:
    lines = [
        "Shares of the server's CPU samples (py-spy --gil: only samples holding the GIL, so waiting "
        "is excluded). Self time goes to the innermost frame (by package, and by function); "
        "inclusive time of first-party functions (the gateway's `app/`, the twin's `bench/`, "
        "LiteLLM's `litellm/`) counts every sample that passes through them. Folded stacks are in `raw/`.",
        "",
    ]
    for system in _systems_in(doc):
        entry = _ok(doc, system)
        if not entry:
            if doc["systems"][system]["status"] == "failed":
                lines += [f"**{system}**: failed (see below)", ""]
            continue
        columns = (entry["self_packages"], entry["self_functions"], entry["first_party_inclusive"])
        depth = min(PROFILE_ROWS, max(len(c) for c in columns))
        rows = [
            [
                str(i + 1),
                *(
                    (f"`{c[i]['name']}` {c[i]['share']:.1%}" if j else f"{c[i]['name']} {c[i]['share']:.1%}")
                    if i < len(c)
                    else ""
                    for j, c in enumerate(columns)
                ),
            ]
            for i in range(depth)
        ]
        lines += [f"**{system}**: {entry['samples']:,} samples", ""]
        lines += _table(["#", "package (self)", "function (self)", "first-party function (inclusive)"], rows)
        lines.append("")
    return lines


def _title(name: str, p: Mapping[str, Any]) -> str:
    """Section titles carry the run's own numbers, so a quick run's report doesn't claim full ones."""
    if name == "overhead":
        return f"1. Overhead: non-stream chat at fixed rates, {p['overhead_upstream_ms']:.0f} ms upstream"
    if name == "streams":
        return (
            f"2. Concurrent SSE streams on one worker: ramp to {p['streams_target']:,}, upstream "
            f"{p['stream_tokens']} tokens at {p['stream_tokens_per_s']:g} token/s"
        )
    if name == "fanout":
        return (
            f"3. Fan-out: one request, {p['fanout_calls']} upstream calls of "
            f"{p['fanout_upstream_ms']:.0f} ms, {p['fanout_clients']} clients"
        )
    if name == "chain":
        return f"4. I/O chain: 4 upstream calls of {p['chain_step_ms']:.0f} ms, {p['chain_clients']} clients"
    if name == "saturation":
        return "5. Saturation: highest open-loop rate with p99 ≤ 1 s and errors ≤ 0.1%, 50 ms upstream"
    if name == "overload":
        return "8. Overload: goodput against offered load past saturation, 50 ms upstream"
    if name == "concurrency250":
        return (
            f"6. {p['concurrency_clients']} concurrent AI requests: closed loop, "
            f"{p['concurrency_upstream_ms'] / 1000:g} s upstream, {p['concurrency_s']:g} s, "
            f"client timeout {p['concurrency_timeout_s']:g} s"
        )
    return f"7. Where the CPU goes: py-spy at {p['profile_rate']} req/s, 50 ms upstream"


SECTIONS: dict[str, Callable[[Doc], list[str]]] = {
    "overhead": overhead_section,
    "streams": streams_section,
    "fanout": fanout_section,
    "chain": chain_section,
    "saturation": saturation_section,
    "overload": overload_section,
    "concurrency250": concurrency_section,
    "profile": profile_section,
}


def failures(docs: Mapping[str, Doc]) -> list[str]:
    lines = []
    for name, doc in docs.items():
        for system, entry in doc["systems"].items():
            if entry["status"] == "failed":
                lines += [
                    f"- **{name} / {system}** failed:",
                    "",
                    "  ```",
                    *(f"  {line}" for line in entry["reason"].splitlines()[-25:]),
                    "  ```",
                ]
            elif entry["status"] == "not_applicable":
                lines.append(f"- {name} / {system}: not applicable: {entry['reason']}")
    return lines


def cpu_lines(docs: Mapping[str, Doc]) -> list[str]:
    """CPU seconds per process, summed over each scenario's measured windows."""
    rows = []
    for name, doc in docs.items():
        for system in _systems_in(doc):
            entry = _ok(doc, system)
            if not entry:
                continue
            totals: dict[str, float] = {}
            wall = 0.0
            for run in _runs(entry):
                wall += run["cpu"]["wall_s"]
                for role, seconds in {
                    **run["cpu"]["cpu_seconds"],
                    "other": run["cpu"]["other_busy_s"],
                }.items():
                    totals[role] = totals.get(role, 0.0) + seconds
            rows.append(
                [
                    name,
                    system,
                    fmt(wall, "s", 1),
                    *(
                        fmt(totals.get(role), "s", 1)
                        for role in (
                            "system_under_test",
                            "load_generator",
                            "simulator",
                            "redis-server",
                            "postgres",
                            "other",
                        )
                    ),
                ]
            )
    return _table(
        [
            "scenario",
            "system",
            "wall",
            "system under test",
            "load generator",
            "simulator",
            "Redis",
            "PostgreSQL",
            "other (not ours)",
        ],
        rows,
    )


def _runs(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if "runs" in entry:
        return list(entry["runs"].values())
    if "plans" in entry:
        return [plan["run"] for plan in entry["plans"].values()]
    if "steps" in entry:
        return [step["run"] for step in entry["steps"]]
    if "ladder" in entry:
        return [step["run"] for step in entry["ladder"]] + [entry["sustained"]["run"]]
    return [entry["run"]]


def write(out: Path) -> None:
    docs = load(out)
    if not docs:
        return
    plots = plot(docs, out)
    first = next(iter(docs.values()))
    meta = first["meta"]
    dirty = f" plus uncommitted changes (fingerprint {meta['tree_fingerprint']})" if meta["git_dirty"] else ""
    lines = [
        "# Benchmark report: flask-ai-gateway against a FastAPI twin, LiteLLM proxy and the bare upstream",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} at commit `{meta['git_commit'][:12]}`"
        f"{dirty}; {first['scale']} scale. CPU: {meta['cpu_model']}, {meta['cpu_count']} cores, "
        f"{meta['memory_gib']} GiB, Linux {meta['kernel']}, Python {meta['python']}.",
        "",
        "Layout: system under test pinned to core "
        f"{meta['layout']['system_under_test']}; load generator and upstream simulator on core "
        f"{meta['layout']['load_generator_and_simulator']}; Redis and PostgreSQL are shared services, "
        "unpinned. Every system runs ONE worker process and talks to the same simulator. Loads are "
        "open-loop at a fixed arrival rate with latency measured from the intended send time, except "
        "where a scenario says closed loop (N clients that each wait for their answer).",
        "",
        "Ratios below are ours / peer from the same run: under 1x is better for ours where lower is "
        "better, over 1x where higher is better. Absolute times are this machine's; compare ratios.",
        "",
        "## Headline: the seeds' claims beside the measured figures",
        "",
        *headline(docs),
        "",
    ]
    for name, doc in docs.items():
        title, section = _title(name, doc["params"]), SECTIONS[name]
        lines += [
            f"## {title}",
            "",
            f"_{doc['meta']['date']}, `{doc['meta']['command']}`_",
            "",
            *section(doc),
            "",
        ]
    lines += ["## What could not run, and why", "", *(failures(docs) or ["Everything ran."]), ""]
    lines += ["## CPU seconds per process during the measured windows", "", *cpu_lines(docs), ""]
    lines += [
        "The 'other' column is machine CPU used by processes outside the benchmark during the window "
        "(the machine is shared); a large value there means that figure is suspect.",
        "",
        "## Systems",
        "",
    ]
    for system, info in _system_info(docs).items():
        lines.append(
            f"- **{system}** ({info.get('version') or 'version unknown'}): "
            + "; ".join(info.get("notes", []))
        )
    lines += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    (out / "REPORT.md").write_text("\n".join(lines))
    with_companions(out)


COMPANIONS = ("TUNING.md", "TWO_INSTANCES.md", "LIVENESS.md", "SOAK.md", "RAG.md", "BATCH.md")
COMPANIONS_HEADING = "## Companion benchmarks"


def with_companions(out: Path) -> None:
    """End REPORT.md with the companion reports (tuning, two instances, liveness, soak, RAG, batch
    throughput). Their own scripts run after the main one in `make bench` and call this again, so
    the section is rewritten each time with whatever companion files exist."""
    path = out / "REPORT.md"
    text = path.read_text() if path.exists() else "# Benchmark report\n"
    parts = [text.split("\n" + COMPANIONS_HEADING)[0].rstrip(), "", COMPANIONS_HEADING, ""]
    for name in COMPANIONS:
        if (out / name).exists():
            body = (out / name).read_text().strip()
            parts += [re.sub(r"^# ", "### ", body, flags=re.M), ""]
    path.write_text("\n".join(parts))


def _system_info(docs: Mapping[str, Doc]) -> dict[str, Mapping[str, Any]]:
    info: dict[str, Mapping[str, Any]] = {}
    for doc in docs.values():
        for system, entry in doc["systems"].items():
            info.setdefault(system, entry.get("system", {}))
    return info


# --- plots -----------------------------------------------------------------------------------------


COLORS = {
    "ours": "tab:blue",
    "twin-httpx": "tab:orange",
    "twin-aiohttp": "tab:green",
    "twin-full-httpx": "tab:brown",
    "twin-full-aiohttp": "tab:olive",
    "litellm": "tab:red",
    "direct": "tab:gray",
}


def plot(docs: Mapping[str, Doc], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "overhead" in docs or "saturation" in docs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for (name, style), system in (
            (pair, system) for pair in (("saturation", "o-"), ("overhead", "x")) for system in SYSTEMS
        ):
            series = sorted(_latency_points(docs.get(name), system))
            if not series:
                continue
            label = f"{system} ({'saturation steps' if name == 'saturation' else 'overhead runs'})"
            for ax, index in ((axes[0], 1), (axes[1], 2)):
                rates = [point[0] for point in series]
                ax.plot(rates, [point[index] for point in series], style, color=COLORS[system], label=label)
        for ax, label in ((axes[0], "p50"), (axes[1], "p99")):
            ax.set_title(f"{label} latency vs offered load (50 ms upstream, one worker)")
            ax.set_xlabel("offered load, req/s (open loop)")
            ax.set_ylabel("latency from intended send, ms")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="x-small")
        fig.tight_layout()
        written.append(_save(fig, out / "latency_vs_load.png"))
    stream_doc = docs.get("streams")
    if stream_doc:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for system in _systems_in(stream_doc):
            entry = _ok(stream_doc, system)
            if not entry:
                continue
            gauges = entry["run"]["gauges"]
            opened = [g["open_streams"] for g in gauges]
            times = [g["t"] for g in gauges]
            color = COLORS[system]
            axes[0].plot(opened, [g["rss_mb"] for g in gauges], ".-", color=color, label=system)
            axes[1].plot(times, opened, "--", color=color, label=f"{system} open")
            axes[1].plot(times, [g["errors"] for g in gauges], "-", color=color, label=f"{system} errors")
        axes[0].set_title("server RSS vs open SSE streams (one worker)")
        axes[0].set_xlabel("open streams")
        axes[0].set_ylabel("RSS, MiB")
        axes[1].set_title("open streams (dashed) and cumulative errors (solid)")
        axes[1].set_xlabel("seconds since the ramp started")
        axes[1].set_ylabel("streams")
        for ax in axes:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
        fig.tight_layout()
        written.append(_save(fig, out / "streams.png"))
    overload_doc = docs.get("overload")
    if overload_doc:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        top = 0.0
        for system in _systems_in(overload_doc):
            entry = _ok(overload_doc, system)
            if not entry:
                continue
            points = [(s["offered_rps"], s["goodput_rps"]) for s in entry["ladder"]]
            sus = entry["sustained"]
            points = sorted([*points, (sus["offered_rps"], sus["goodput_rps"])])
            top = max(top, *(p[0] for p in points))
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=COLORS[system], label=system)
        ax.plot([0, top], [0, top], ":", color="grey", label="goodput = offered")
        ax.set_title("goodput (2xx/s) against offered load, one worker, 50 ms upstream")
        ax.set_xlabel("offered req/s")
        ax.set_ylabel("2xx/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        written.append(_save(fig, out / "overload.png"))
    return written


def _latency_points(doc: Doc | None, system: str) -> list[tuple[float, float, float]]:
    entry = _ok(doc, system) if doc else None
    if not entry:
        return []
    if "runs" in entry:
        runs = [(float(rate), run) for rate, run in entry["runs"].items()]
    else:
        runs = [(float(step["rate"]), step["run"]) for step in entry["steps"]]
    return [
        (rate, run["latency_ms"]["p50"], run["latency_ms"]["p99"])
        for rate, run in runs
        if run["latency_ms"]["p50"] is not None
    ]


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
