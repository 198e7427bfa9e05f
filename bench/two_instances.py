"""Two gateway instances on one machine, sharing PostgreSQL and Redis: do global rules hold?

    python -m bench.two_instances     # about 1 minute; bench/results/two_instances.json + .md

Two gunicorn instances (2 gevent workers each, different ports) on one PostgreSQL database and
one Redis, with nothing in front but this script alternating between them:

- **rate limit**: a tenant limited to 50/minute sends 200 concurrent requests, 100 to each
  instance; how many are admitted (the limit is global, so 50);
- **revocation**: a key used (so cached) on both instances is revoked through the first; the
  time until the second refuses it, and how many requests the second still admitted after the
  revocation was acknowledged (0 expected: revocations are published at once);
- **registry**: a new version is canaried at 100% and promoted through the first; the time until
  every answer of the second comes from it, against REGISTRY_POLL (1 s).

The tests assert the same guarantees (tests/test_rate_limits.py, test_identity_server.py,
test_registry.py); this measures them on the production shape and keeps the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench import companion, report, systems
from bench.run import RESULTS

CATALOGUE = "models:\n  - name: sentiment\n    backend: vader\n"
TENSOR = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}
POLL_LIMIT_S = 10.0


class Pair(companion.Gateway):
    """The gateway as deployed: two instances of it, two workers each."""

    def __init__(self, ctx: systems.RunContext, catalogue: Path) -> None:
        super().__init__(ctx, "two-instances", catalogue, {"WEB_CONCURRENCY": "2"})

    @contextlib.contextmanager
    def both(self) -> Iterator[tuple[systems.Live, systems.Live]]:
        with self.start("first") as first, self.start("second") as second:
            yield first, second


def _get(url: str, key: str, path: str) -> requests.Response:
    with requests.Session() as session:
        return session.get(
            url + path, headers={"Authorization": f"Bearer {key}", "Connection": "close"}, timeout=30
        )


def rate_limit(first: systems.Live, second: systems.Live, key: str) -> dict[str, Any]:
    def call(i: int) -> int:
        return _get((first if i % 2 else second).base_url, key, "/v1/auth/me").status_code

    with ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(call, range(200)))
    return {
        "limit": "50/minute",
        "sent": 200,
        "admitted": statuses.count(200),
        "refused_429": statuses.count(429),
    }


def revocation(first: systems.Live, second: systems.Live, key: str, admin: str) -> dict[str, Any]:
    assert _get(first.base_url, key, "/v1/models").status_code == 200
    assert _get(second.base_url, key, "/v1/models").status_code == 200  # now in the second's cache
    me = _get(first.base_url, key, "/v1/auth/me").json()
    key_id = me["key_id"]
    resp = requests.post(
        f"{first.base_url}/v1/governance/keys/{key_id}/revoke",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    resp.raise_for_status()
    acknowledged = time.monotonic()
    admitted_after = 0
    while time.monotonic() - acknowledged < POLL_LIMIT_S:
        status = _get(second.base_url, key, "/v1/models").status_code
        if status == 401:
            break
        admitted_after += status == 200
    return {
        "refused_by_second_after_ms": round((time.monotonic() - acknowledged) * 1000, 1),
        "admitted_by_second_after_revocation": admitted_after,
    }


def registry(first: systems.Live, second: systems.Live, user: str, admin: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {admin}"}
    base = first.base_url + "/v1/governance/models/sentiment"
    requests.post(base + "/versions", json={"version": "2", "backend": "vader"}, headers=headers, timeout=30)
    requests.put(
        base + "/traffic", json={"canary_version": "2", "canary_weight": 100}, headers=headers, timeout=30
    ).raise_for_status()
    requests.post(base + "/promote", headers=headers, timeout=30).raise_for_status()
    changed = time.monotonic()

    def served_by_second() -> set[str]:
        def one(i: int) -> str:
            with requests.Session() as session:
                return session.post(
                    second.base_url + "/v2/models/sentiment/infer",
                    headers={"Authorization": f"Bearer {user}", "Connection": "close"},
                    json={"inputs": [TENSOR], "parameters": {"user": f"u{i}"}},
                    timeout=30,
                ).headers.get("X-Model-Version", "")

        with ThreadPoolExecutor(8) as pool:
            return set(pool.map(one, range(16)))

    while time.monotonic() - changed < POLL_LIMIT_S and served_by_second() != {"sentiment/2"}:
        time.sleep(0.05)
    return {"promoted_version_served_by_second_after_s": round(time.monotonic() - changed, 2), "poll_s": 1.0}


def markdown(result: dict[str, Any]) -> str:
    rl, rv, rg = result["rate_limit"], result["revocation"], result["registry"]
    return (
        "# Two instances, one PostgreSQL, one Redis\n\n"
        f"Run {result['started']}, commit {result['commit']}: two gunicorn instances of 2 gevent "
        "workers each, on different ports, driven alternately.\n\n"
        "| guarantee | measured |\n|---|---|\n"
        f"| tenant limit {rl['limit']}, 200 concurrent requests split over both | "
        f"{rl['admitted']} admitted, {rl['refused_429']} refused 429 |\n"
        "| key revoked through the first, refused by the second | "
        f"after {rv['refused_by_second_after_ms']} ms; "
        f"{rv['admitted_by_second_after_revocation']} requests admitted after the revocation |\n"
        f"| canary promoted through the first, served by the second | after "
        f"{rg['promoted_version_served_by_second_after_s']} s (REGISTRY_POLL {rg['poll_s']} s) |\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    # The base settings name an upstream, so the simulator runs; this catalogue calls none.
    with companion.run_context(args.out, "two-instances", CATALOGUE) as (ctx, catalogue):
        run(ctx, catalogue, args.out)


def run(ctx: systems.RunContext, catalogue: Path, out: Path) -> None:
    pair = Pair(ctx, catalogue)
    pair.prepare()
    try:
        pair.flask("tenants", "create", "limited", "--rate-limit", "50/minute")
        pair.flask("tenants", "create", "platform")
        limited, admin = pair.issue("limited"), pair.issue("platform", "--scopes", "admin")
        doomed, user = pair.issue("bench"), pair.issue("bench")
        with pair.both() as (first, second):
            result = {
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "commit": pair.version,
                "rate_limit": rate_limit(first, second, limited),
                "revocation": revocation(first, second, doomed, admin),
                "registry": registry(first, second, user, admin),
            }
    finally:
        pair.cleanup()
    (out / "two_instances.json").write_text(json.dumps(result, indent=2))
    (out / "TWO_INSTANCES.md").write_text(markdown(result))
    report.with_companions(out)
    print(markdown(result))


if __name__ == "__main__":
    main()
