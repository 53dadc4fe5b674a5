"""A serial deploy under load, with 2 and 4 web servers: the deploy's wall time, the requests
served and failed (must be 0), and latency p50/p99 during the deploy against the same load,
same environment, without a deploy (measured first, side by side in one run). Then, in an
environment with autoscaling (target 4 requests/s per server, interval 1 s, health_grace 3 s),
without and then with a warm pool of one server (autoscaling.warm): the time from a load step to
a new web server taking traffic, and from a web server's death (kill -9 of everything in its
namespace) to its replacement taking traffic: the first response a new server gives (/api/info
names the server that answered), with the autoscaler's steps.

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
    wait_for,
)

ENV = "bench"
CLIENTS = 4  # two keep-alive, two opening a connection per request


class Load:
    def __init__(self, url: str):
        self.url, self.stop, self.samples, self.failures = url, threading.Event(), [], 0
        self.served: list[tuple[float, str]] = []  # (monotonic time, the web server that answered)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i % 2 == 0,), daemon=True) for i in range(CLIENTS)]

    def one(self, http: httpx.Client) -> None:
        started = time.perf_counter()
        server = None
        try:
            response = http.get(self.url + "/api/info")
            ok = response.status_code == 200
            server = response.json().get("server") if ok else None
        except (httpx.HTTPError, ValueError):
            ok = False
        with self.lock:
            if ok:
                self.samples.append(time.perf_counter() - started)
                self.served.append((time.monotonic(), server))
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

    def first_answer(self, since: float, besides: set[str]) -> float | None:
        """When a web server not in `besides` first answered, at or after `since` (monotonic)."""
        with self.lock:
            return next((t for t, server in self.served if t >= since and server not in besides), None)

    def servers_since(self, since: float) -> set[str]:
        with self.lock:
            return {server for t, server in self.served if t >= since}

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
                "phases": [(ph["name"], ph["seconds"]) for ph in record["phases"]],
                "output": deployed.stderr.splitlines()}  # each step with its time: where the seconds go
    finally:
        env.destroy()


def autoscaling(warm: int) -> str:
    return ("    autoscaling: {min: 1, desired: 1, max: 2, metric: requests, target: 4, scale_out_cooldown: 0, "
            f"scale_in_cooldown: 600, health_grace: 3, interval: 1, window: 3, warm: {warm}}}\n")


def warm_ready(env: Environment, since_wall: float) -> bool:
    """The warm pool has a server the autoscaler finished starting after `since_wall`, still warm."""
    path = env.env_dir / "autoscaler.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    started = {n for e in entries if e.get("action") == "warm" and e.get("outcome") == "ok"
               and e.get("ts", 0) >= since_wall for n in e.get("warmed", [])}
    servers = json.loads((env.env_dir / "state.json").read_text())["servers"]
    return any(servers.get(n, {}).get("warm") for n in started)


def autoscaler_steps(env: Environment, since_wall: float) -> list[dict]:
    """The autoscaler's changes since `since_wall`, from its decisions log (an entry is written when
    the change ends): what, when it started (s after `since_wall`), and how long it took."""
    path = env.env_dir / "autoscaler.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{"action": e.get("action"), "started_s": round(e["ts"] - (e.get("seconds") or 0) - since_wall, 1),
             "seconds": e.get("seconds"),
             "outcome": e.get("outcome")}
            for e in entries if isinstance(e.get("ts"), (int, float)) and e["ts"] >= since_wall and e.get("outcome")]


def autoscaling_scenario(base: Path, warm: int) -> dict:
    """Taking traffic is what the clients see: the first response a new web server gives (the
    sample app's /api/info names the server that answered it). With `warm`, the warm pool is
    waited for before the load step, and refilled before the kill."""
    env = Environment.new(base, f"bscale-{secrets.token_hex(2)}", ENV,
                          servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}",
                          extra=autoscaling(warm))
    try:
        created(env)
        if warm:
            wait_for(lambda: warm_ready(env, 0), 120, message="the warm pool started")
        first = set(env.web_health())
        with Load(env.url) as load:  # 4 clients: far above 4 requests/s for one server
            loaded, loaded_wall = time.monotonic(), time.time()
            answered = wait_for(lambda: load.first_answer(loaded, first), 120,
                                message="a second web server taking traffic")
            wait_for(lambda: len(load.servers_since(time.monotonic() - 1)) == 2, 60, message="both servers answering")
            if warm:   # refilled under the load, before the kill
                wait_for(lambda: warm_ready(env, loaded_wall), 120, message="the warm pool refilled")
            before = load.servers_since(loaded)
            victim = sorted(before)[0]
            killed = time.monotonic()
            kill_namespace(env.netns(victim))
            replaced = wait_for(lambda: load.first_answer(killed, before), 180, message=f"{victim} replaced")
            failed = load.failures
        # the replacement's entry is written when the change ends, after its server answered
        wait_for(lambda: any(s["action"] == "replace" for s in autoscaler_steps(env, loaded_wall)), 60,
                 message="the replacement logged")
        return {"warm": warm, "load_step_to_new_server_s": round(answered - loaded, 1),
                "new_server": sorted(load.servers_since(loaded) - first)[:1],
                "death_to_replacement_s": round(replaced - killed, 1), "killed": victim,
                "killed_at_s": round(killed - loaded, 1), "steps": autoscaler_steps(env, loaded_wall),
                "failed_requests": failed}
    finally:
        env.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webs", type=int, nargs="*", default=[2, 4], help="web servers per deploy (none: no deploy)")
    parser.add_argument("--no-autoscaling", action="store_true", help="skip the autoscaling scenario")
    args = parser.parse_args()
    require_root("deploy.py")
    base = temp_base("fabula-bench-")
    try:
        results = [scenario(base, n) for n in args.webs]
        # without and with a warm pool, one after the other
        scaling = [] if args.no_autoscaling else [autoscaling_scenario(base, warm) for warm in (0, 1)]
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
    for run in scaling:
        print(f"autoscaling, warm pool {run['warm']}: load step -> new server taking traffic "
              f"{run['load_step_to_new_server_s']} s; web server killed -> replacement taking traffic "
              f"{run['death_to_replacement_s']} s ({run['failed_requests']} requests failed, while the load "
              "balancer had the dead server)")
        print(f"  the autoscaler's changes (seconds after the load step; {run['killed']} killed at "
              f"+{run['killed_at_s']} s): " + "; ".join(
                  f"{s['action']} from +{s['started_s']} s, took {s['seconds']} s ({s['outcome']})"
                  for s in run["steps"]))
    if len(scaling) == 2:
        cold, warm = scaling
        print(f"warm pool of 1 / none: load step -> in service "
              f"{warm['load_step_to_new_server_s'] / cold['load_step_to_new_server_s']:.2f}; death -> replacement "
              f"{warm['death_to_replacement_s'] / cold['death_to_replacement_s']:.2f}")
    save_results("deploy", {"deploys": results, "autoscaling": scaling})


if __name__ == "__main__":
    main()
