"""Wall time of `fabula create` for the sample app, and the environment's peak memory.

Scenarios, in one run: a cold create (empty wheel cache) and a warm one of the 7-part
environment (2 web servers), then warm creates with 1, 2, 4 and 8 web servers. Each environment
is destroyed before the next one starts (its destroy time is reported too). Memory is the sum of
the proportional set size (PSS, so shared libraries are not counted twice) of every process in
the environment's namespaces plus its load balancer, sampled every 0.5 s during and after create.

Run as root: `make bench` or `.venv/bin/python bench/create.py [--quick]`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.helpers import free_port, make_app_repo, run_fabula  # noqa: E402

ENV = "bench"


def netns_inodes(prefix: str) -> set[int]:
    run = Path("/run/netns")
    return {p.stat().st_ino for p in run.iterdir() if p.name.startswith(prefix)} if run.exists() else set()


def environment_pss_kib(prefix: str, env_dir: str) -> int:
    inodes = netns_inodes(prefix)
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            mine = os.stat(proc / "ns" / "net").st_ino in inodes or env_dir.encode() in (proc / "cmdline").read_bytes()
            if mine:
                for line in (proc / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


class PeakSampler(threading.Thread):
    def __init__(self, prefix: str, env_dir: str):
        super().__init__(daemon=True)
        self.prefix, self.env_dir, self.peak, self.stop = prefix, env_dir, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, environment_pss_kib(self.prefix, self.env_dir))
            self.stop.wait(0.5)


def scenario(base: Path, label: str, webs: int, cold: bool) -> dict:
    project = f"bench-{secrets.token_hex(2)}"
    app = make_app_repo(base / project, project, ENV, free_port(), free_port(),
                        servers=f"{{web: {webs}, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}")
    state = base / "state"
    if cold:
        shutil.rmtree(state / "cache", ignore_errors=True)
    sampler = PeakSampler(f"fab.{project}.{ENV}.", str(state / project / ENV))
    sampler.start()
    started = time.monotonic()
    created = run_fabula("create", ENV, cwd=app, state_dir=state, timeout=1800)
    create_s = time.monotonic() - started
    time.sleep(2)  # two more samples of the settled environment
    sampler.stop.set()
    sampler.join()
    started = time.monotonic()
    destroyed = run_fabula("destroy", ENV, "--yes", cwd=app, state_dir=state, timeout=600)
    destroy_s = time.monotonic() - started
    if created.returncode or destroyed.returncode:
        raise SystemExit(f"{label}: create rc={created.returncode} destroy rc={destroyed.returncode}\n"
                         f"{created.stderr[-3000:]}\n{destroyed.stderr[-2000:]}")
    return {"scenario": label, "web": webs, "servers": webs + 4, "cold": cold, "create_s": round(create_s, 1),
            "destroy_s": round(destroy_s, 1), "peak_pss_mib": round(sampler.peak / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cold and warm 7-part creates")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/create.py needs root (the local provider makes network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="fabula-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    plan = [("cold, 2 web", 2, True), ("warm, 2 web", 2, False)]
    if not args.quick:
        plan += [(f"warm, {n} web", n, False) for n in (1, 4, 8)]
    results = []
    try:
        for label, webs, cold in plan:
            results.append(scenario(base, label, webs, cold))
            print(f"{label}: {results[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = Table(title="fabula create (sample app, local provider)")
    for column in ("scenario", "servers", "create s", "destroy s", "peak PSS MiB"):
        table.add_column(column, justify="right" if column != "scenario" else "left")
    for r in results:
        table.add_row(r["scenario"], str(r["servers"] + 1) + " (incl. LB)", str(r["create_s"]),
                      str(r["destroy_s"]), str(r["peak_pss_mib"]))
    Console(width=120).print(table)
    warm = next(r for r in results if r["scenario"] == "warm, 2 web")
    cold = results[0]
    print(f"cold/warm create ratio: {cold['create_s'] / warm['create_s']:.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "create.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
