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
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from harness import (
    Environment,
    environment_processes,
    machine_busy_seconds,
    remove_unless_left,
    require_root,
    save_results,
    table,
    temp_base,
)

ENV = "bench"


def environment_pss_kib(env: Environment) -> int:
    """PSS of every process in the environment's namespaces or naming its directory (its load
    balancer), in KiB."""
    total = 0
    for proc in environment_processes([env.ns_prefix], [str(env.env_dir).encode()]):
        try:
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


class PeakSampler(threading.Thread):
    def __init__(self, env: Environment):
        super().__init__(daemon=True)
        self.env, self.peak, self.stop = env, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, environment_pss_kib(self.env))
            self.stop.wait(0.5)


def scenario(base: Path, label: str, webs: int, cold: bool) -> dict:
    env = Environment.new(base, f"bench-{secrets.token_hex(2)}", ENV,
                          servers=f"{{web: {webs}, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}")
    if cold:
        shutil.rmtree(env.state_dir / "cache", ignore_errors=True)
    sampler = PeakSampler(env)
    sampler.start()
    started, busy = time.monotonic(), machine_busy_seconds()
    created = env.fabula("create", ENV, timeout=1800)
    create_s = time.monotonic() - started
    # the whole machine's CPU time during the create (2 cores: create_s x 2 at most): how close
    # to the machine's floor it is
    busy = machine_busy_seconds() - busy
    time.sleep(2)  # two more samples of the settled environment
    sampler.stop.set()
    sampler.join()
    # where create's time goes: its phases, and the release's build (an operation of its own)
    phases = []
    for record in json.loads(env.fabula("history", ENV, "--json").stdout or "[]"):
        if record["action"] == "create":
            phases += [(phase["name"], phase["seconds"]) for phase in record["phases"]]
        elif record["action"] == "release build":
            phases.append(("release build", record["seconds"]))
    started = time.monotonic()
    destroyed = env.fabula("destroy", ENV, "--yes", timeout=600)
    destroy_s = time.monotonic() - started
    if created.returncode or destroyed.returncode:
        raise SystemExit(f"{label}: create rc={created.returncode} destroy rc={destroyed.returncode}\n"
                         f"{created.stderr[-3000:]}\n{destroyed.stderr[-2000:]}")
    return {"scenario": label, "web": webs, "servers": webs + 4, "cold": cold, "create_s": round(create_s, 1),
            "busy_core_s": round(busy, 1),
            "destroy_s": round(destroy_s, 1), "peak_pss_mib": round(sampler.peak / 1024), "phases": phases,
            "output": created.stderr.splitlines()}  # each step with its time: where the seconds go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cold and warm 7-part creates")
    args = parser.parse_args()
    require_root("create.py")
    base = temp_base("fabula-bench-")
    plan = [("cold, 2 web", 2, True), ("warm, 2 web", 2, False)]
    if not args.quick:
        plan += [(f"warm, {n} web", n, False) for n in (1, 4, 8)]
    results = []
    try:
        for label, webs, cold in plan:
            results.append(scenario(base, label, webs, cold))
            print(f"{label}: { {k: v for k, v in results[-1].items() if k != 'output'} }", file=sys.stderr)
    finally:
        remove_unless_left(base)
    figures = table("fabula create (sample app, local provider)",
                    ("scenario", "servers", "create s", "CPU busy core-s", "destroy s", "peak PSS MiB"),
                    left=("scenario",))
    for r in results:
        figures.add_row(r["scenario"], str(r["servers"] + 1) + " (incl. LB)", str(r["create_s"]),
                        str(r["busy_core_s"]), str(r["destroy_s"]), str(r["peak_pss_mib"]))
    Console(width=120).print(figures)
    for r in results:
        print(f"{r['scenario']}: " + ", ".join(f"{name} {sec} s" for name, sec in r["phases"]))
    warm = next(r for r in results if r["scenario"] == "warm, 2 web")
    cold = results[0]
    print(f"cold/warm create ratio: {cold['create_s'] / warm['create_s']:.2f}")
    save_results("create", results)


if __name__ == "__main__":
    main()
