"""What the companion benchmarks (tuning, two instances, soak) share: a gateway on a catalogue of
their own, and a run directory with the simulator and the shared services around it.

`bench.run` compares systems scenario by scenario; a companion measures the gateway alone, in a
deployment shape of its own (several workers, two instances, hours of load), so it needs only
the gateway's system class with different settings, and one context to run it in.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench import procs, systems
from bench.run import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL
from bench.upstream_sim import run_simulator


class Gateway(systems.Ours):
    """The gateway with the companion's own catalogue and settings over the benchmark's."""

    def __init__(
        self, ctx: systems.RunContext, name: str, catalogue: Path, settings: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(ctx)
        self.name = name
        self.catalogue = catalogue
        self.settings = dict(settings or {})

    def env(self) -> dict[str, str]:
        return {**super().env(), "MODELS_CONFIG": str(self.catalogue), **self.settings}

    def issue(self, tenant: str, *extra: str) -> str:
        """A new key for `tenant` (`flask keys issue` options in `extra`)."""
        return systems.issued_key(self.flask("keys", "issue", tenant, "--name", uuid.uuid4().hex[:8], *extra))


@contextlib.contextmanager
def run_context(
    out: Path, label: str, catalogue: str, **simulator: Any
) -> Iterator[tuple[systems.RunContext, Path]]:
    """A fresh raw/<label>-<id>/ under `out` with the catalogue written in it, the simulator
    running (with `simulator` knobs), and the benchmark's Redis and PostgreSQL."""
    run_id = uuid.uuid4().hex[:8]
    raw_dir = out / "raw" / f"{label}-{run_id}"
    raw_dir.mkdir(parents=True, exist_ok=True)
    path = raw_dir / "models.yaml"
    path.write_text(catalogue)
    with run_simulator(**simulator) as sim:
        yield (
            systems.RunContext(
                sim=sim,
                raw_dir=raw_dir,
                layout=procs.Layout(None, None),
                run_id=run_id,
                redis_url=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                postgres_url=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
            ),
            path,
        )
