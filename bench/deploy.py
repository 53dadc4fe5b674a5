"""A serial deploy under load, with 2 and 4 web servers: the deploy's wall time, the requests
served and failed (must be 0), and latency p50/p99 during the deploy against the same load,
same environment, without a deploy (measured first, side by side in one run). Then, in an
environment with autoscaling (target 4 requests/s per server, interval 1 s, health_grace 3 s):
the time from a load step to a new web server taking traffic, and from a web server's death
(kill -9 of everything in its namespace) to its replacement taking traffic.

Run as root: `.venv/bin/python bench/deploy.py [--webs 2 4]`.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from fabula.sample import git
from harness import (
    BenchError,
    Environment,
    kill_namespace,
    remove_unless_left,
    require_root,
    save_results,
    table,
    temp_base,
    timed_wait,
)

ENV = "bench"
CLIENTS = 4  # two keep-alive, two opening a connection per request


class Load:
    def __init__(self, url: str):
        self.url, self.stop, self.samples, self.failures = url, threading.Event(), [], 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i % 2 == 0,), daemon=True) for i in range(CLIENTS)]

    def one(self, http: httpx.Client) -> None:
        started = time.perf_counter()
        try:
            ok = http.get(self.url + "/api/info").status_code == 200
        except httpx.HTTPError:
            ok = False
        with self.lock:
            if ok:
                self.samples.append(time.perf_counter() - started)
            else:
                self.failures += 1

    def run(self, keep_alive: bool) -> None:
        shared = httpx.Client(verify=False, timeout=15) if keep_alive else None
        while not self.stop.is_set():
            if shared:
                self.one(shared)
            else:
                with httpx.Client(verify=False, timeout=15) as http:
                    self.one(http)
        if shared:
            shared.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def figures(self, seconds: float) -> dict:
        ordered = sorted(self.samples)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0
        return {"requests": len(ordered), "failed": self.failures, "rps": round(len(ordered) / seconds, 1),
                "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
                "mean_ms": round(statistics.fmean(ordered) * 1000, 1) if ordered else 0}


def commit_change(app: Path, marker: str) -> None:
    page = app / "notes" / "templates" / "notes" / "index.html"
    page.write_text(page.read_text().replace("<h1>Polls on fabula", f"<h1>Polls on fabula {marker}", 1))
    git(app, "commit", "-qam", marker)


def created(env: Environment) -> None:
    result = env.fabula("create", ENV, timeout=1200)
    if result.returncode:
        raise BenchError(f"create {env.project} failed (rc {result.returncode}):\n{result.stderr[-3000:]}")


def scenario(base: Path, webs: int) -> dict:
    env = Environment.new(base, f"bdeploy-{secrets.token_hex(2)}", ENV,
                          servers=f"{{web: {webs}, worker: 1, cache: 1, db-primary: 1, db-replica: 0}}")
    try:
        created(env)
        commit_change(env.app_dir, "v2")
        env.fabula("release", "build", ENV)  # the build is not the deploy
        with Load(env.url) as baseline:
            started = time.monotonic()
            time.sleep(15)
        base_figures = baseline.figures(time.monotonic() - started)
        with Load(env.url) as during:
            started = time.monotonic()
            deployed = env.fabula("deploy", ENV, "--serial", timeout=1200)
            seconds = time.monotonic() - started
        if deployed.returncode:
            raise BenchError(f"deploy failed (rc {deployed.returncode}):\n{deployed.stderr[-3000:]}")
        history = json.loads(env.fabula("history", ENV, "--json").stdout)
        record = next(r for r in reversed(history) if r["action"] == "deploy")
        return {"webs": webs, "deploy_s": round(seconds, 1), "baseline": base_figures,
                "during": during.figures(seconds), "own_s": record["seconds"],
                "phases": [(ph["name"], ph["seconds"]) for ph in record["phases"]]}
    finally:
        env.destroy()


AUTOSCALING = ("    autoscaling: {min: 1, desired: 1, max: 2, metric: requests, target: 4, scale_out_cooldown: 0, "
               "scale_in_cooldown: 600, health_grace: 3, interval: 1, window: 3}\n")


def autoscaling_scenario(base: Path) -> dict:
    env = Environment.new(base, f"bscale-{secrets.token_hex(2)}", ENV,
                          servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}", extra=AUTOSCALING)
    try:
        created(env)
        first = set(env.web_health())
        with Load(env.url):  # 4 clients: far above 4 requests/s for one server
            step = timed_wait(lambda: sum(v == "UP" for v in env.web_health().values()) == 2, 120,
                              message="a second web server taking traffic")
        new = sorted(set(env.web_health()) - first)
        victim = sorted(env.web_health())[0]
        kill_namespace(env.netns(victim))
        healed = timed_wait(lambda: victim not in (h := env.web_health()) and
                            sum(v == "UP" for v in h.values()) == 2, 180, message=f"{victim} replaced")
        return {"load_step_to_new_server_s": round(step, 1), "new_server": new,
                "death_to_replacement_s": round(healed, 1), "killed": victim}
    finally:
        env.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webs", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    require_root("deploy.py")
    base = temp_base("fabula-bench-")
    try:
        results = [scenario(base, n) for n in args.webs]
        scaling = autoscaling_scenario(base)
    except BenchError as exc:
        raise SystemExit(f"bench/deploy.py failed: {exc}") from None
    finally:
        remove_unless_left(base)
    figures = table(f"serial deploy under load ({CLIENTS} clients, GET /api/info through the load balancer)",
                    ("web servers", "deploy s", "requests", "failed", "p50 ms (no deploy)", "p50 ms (deploy)",
                     "p99 ms (no deploy)", "p99 ms (deploy)", "p99 ratio"))
    for r in results:
        b, d = r["baseline"], r["during"]
        figures.add_row(str(r["webs"]), str(r["deploy_s"]), str(d["requests"]), str(d["failed"]), str(b["p50_ms"]),
                        str(d["p50_ms"]), str(b["p99_ms"]), str(d["p99_ms"]),
                        f"{d['p99_ms'] / b['p99_ms']:.2f}" if b["p99_ms"] else "-")
    Console(width=160).print(figures)
    for r in results:   # where a deploy's time goes: its own seconds (the CLI's start aside) and its phases
        print(f"{r['webs']} web servers: deploy's own {r['own_s']} s; phases: "
              + ", ".join(f"{name} {sec} s" for name, sec in r["phases"]))
    print(f"autoscaling: load step -> new server taking traffic {scaling['load_step_to_new_server_s']} s; "
          f"web server killed -> replacement taking traffic {scaling['death_to_replacement_s']} s")
    save_results("deploy", {"deploys": results, "autoscaling": scaling})


if __name__ == "__main__":
    main()
