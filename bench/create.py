"""Wall time of `fabula create` for the sample app, and the environment's peak memory.

Scenarios, in one run: a cold create (empty wheel cache) and a warm one of the 7-part
environment (2 web servers), then warm creates with 1, 4 and 8 web servers, each environment
kept (idle: its CPU shows as "other load") until all are created, then destroyed one after
another (each destroy's time is reported too); last, the 7-part create again, right after
those destroys (see `main` for why creates are kept apart from destroys). Memory is the sum of
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


def new_environment(base: Path, webs: int) -> Environment:
    return Environment.new(base, f"bench-{secrets.token_hex(2)}", ENV,
                           servers=f"{{web: {webs}, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}")


def created(env: Environment, label: str, webs: int, cold: bool) -> dict:
    """`env`, of `webs` web servers, created: its figures (but its destroy's)."""
    if cold:
        shutil.rmtree(env.state_dir / "cache", ignore_errors=True)
    # what the machine does without this create (the environments kept before it, idle)
    before = machine_busy_seconds()
    time.sleep(2)
    background = (machine_busy_seconds() - before) / 2
    sampler = PeakSampler(env)
    sampler.start()
    started, busy = time.monotonic(), machine_busy_seconds()
    result = env.fabula("create", ENV, timeout=1800)
    create_s = time.monotonic() - started
    # the whole machine's CPU time during the create (2 cores: create_s x 2 at most): how close
    # to the machine's floor it is
    busy = machine_busy_seconds() - busy
    time.sleep(2)  # two more samples of the settled environment
    sampler.stop.set()
    sampler.join()
    if result.returncode:
        raise SystemExit(f"{label}: create rc={result.returncode}\n{result.stderr[-3000:]}")
    # where create's time goes: its phases, and the release's build (an operation of its own)
    phases = []
    for record in json.loads(env.fabula("history", ENV, "--json").stdout or "[]"):
        if record["action"] == "create":
            phases += [(phase["name"], phase["seconds"]) for phase in record["phases"]]
        elif record["action"] == "release build":
            phases.append(("release build", record["seconds"]))
    return {"scenario": label, "web": webs, "servers": webs + 4, "cold": cold, "create_s": round(create_s, 1),
            "busy_core_s": round(busy, 1), "background_cores": round(background, 2),
            "peak_pss_mib": round(sampler.peak / 1024), "phases": phases,
            "output": result.stderr.splitlines()}  # each step with its time: where the seconds go


def destroyed(env: Environment, figures: dict) -> None:
    started = time.monotonic()
    result = env.fabula("destroy", ENV, "--yes", timeout=600)
    figures["destroy_s"] = round(time.monotonic() - started, 1)
    if result.returncode:
        raise SystemExit(f"{figures['scenario']}: destroy rc={result.returncode}\n{result.stderr[-2000:]}")


def slope(rows: list[dict], figure: str) -> float:
    """The least-squares slope of `figure` over the rows' web server counts."""
    xs, ys = [r["web"] for r in rows], [r[figure] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cold and warm 7-part creates")
    args = parser.parse_args()
    require_root("create.py")
    base = temp_base("fabula-bench-")
    plan = [("cold, 2 web", 2, True), ("warm, 2 web", 2, False)]
    if not args.quick:
        plan += [(f"warm, {n} web", n, False) for n in (1, 4, 8)]
    results: list[dict] = []
    kept: list[Environment] = []
    try:
        # every environment is kept until all are created: on an ext4 without a journal (this
        # machine's), an inode freed less than 5 minutes before is not reused, and finding a
        # free one scans past each such inode of the block group, so that a create right after
        # a destroy of ~20,000 files paid several core-seconds more, growing through a run
        for label, webs, cold in plan:
            kept.append(new_environment(base, webs))
            figures = created(kept[-1], label, webs, cold)
            results.append(figures)
            print(f"{label}: { {k: v for k, v in figures.items() if k != 'output'} }", file=sys.stderr)
        while kept:
            destroyed(kept[0], results[len(results) - len(kept)])
            kept.pop(0)
        # and, for comparison, the same create right after those destroys (what it pays depends
        # on where its folders land)
        kept.append(new_environment(base, 2))
        figures = created(kept[-1], "warm, 2 web, right after destroys", 2, False)
        destroyed(kept[-1], figures)
        kept.pop()
        results.append(figures)
        print(f"{figures['scenario']}: { {k: v for k, v in figures.items() if k != 'output'} }", file=sys.stderr)
    finally:
        for env in kept:
            env.destroy()
        remove_unless_left(base)
    figures = table("fabula create (sample app, local provider)",
                    ("scenario", "servers", "create s", "CPU busy core-s", "other load, cores", "destroy s",
                     "peak PSS MiB"),
                    left=("scenario",))
    for r in results:
        figures.add_row(r["scenario"], str(r["servers"] + 1) + " (incl. LB)", str(r["create_s"]),
                        str(r["busy_core_s"]), str(r["background_cores"]), str(r["destroy_s"]),
                        str(r["peak_pss_mib"]))
    Console(width=120).print(figures)
    for r in results:
        print(f"{r['scenario']}: " + ", ".join(f"{name} {sec} s" for name, sec in r["phases"]))
    warm = next(r for r in results if r["scenario"] == "warm, 2 web")
    cold = results[0]
    print(f"cold/warm create ratio: {cold['create_s'] / warm['create_s']:.2f}")
    print(f"right after destroys / warm create ratio: {results[-1]['create_s'] / warm['create_s']:.2f}")
    sizes = results[1:-1]   # the warm creates of 2, 1, 4 and 8 web servers
    if len(sizes) > 2:
        print(f"each extra web server (least squares over {', '.join(str(r['web']) for r in sizes)}): "
              f"{slope(sizes, 'create_s'):.2f} s, {slope(sizes, 'busy_core_s'):.2f} core-s")
    save_results("create", results)


if __name__ == "__main__":
    main()
