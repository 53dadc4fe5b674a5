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
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.helpers import free_port, make_app_repo, run_fabula  # noqa: E402

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
        pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0
        return {"requests": len(ordered), "failed": self.failures, "rps": round(len(ordered) / seconds, 1),
                "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
                "mean_ms": round(statistics.fmean(ordered) * 1000, 1) if ordered else 0}


def commit_change(app: Path, marker: str) -> None:
    page = app / "notes" / "templates" / "notes" / "index.html"
    page.write_text(page.read_text().replace("<h1>Polls on fabula", f"<h1>Polls on fabula {marker}", 1))
    git = ["git", "-C", str(app), "-c", "user.email=b@fabula.invalid", "-c", "user.name=b"]
    subprocess.run(git + ["commit", "-qam", marker], check=True)


def scenario(base: Path, webs: int) -> dict:
    project = f"bdeploy-{secrets.token_hex(2)}"
    https = free_port()
    app = make_app_repo(base / project, project, ENV, https, free_port(),
                        servers=f"{{web: {webs}, worker: 1, cache: 1, db-primary: 1, db-replica: 0}}")
    state, url = base / "state", f"https://127.0.0.1:{https}"
    try:
        created = run_fabula("create", ENV, cwd=app, state_dir=state, timeout=1200)
        assert created.returncode == 0, created.stderr
        commit_change(app, "v2")
        run_fabula("release", "build", ENV, cwd=app, state_dir=state)  # the build is not the deploy
        with Load(url) as baseline:
            started = time.monotonic()
            time.sleep(15)
        base_figures = baseline.figures(time.monotonic() - started)
        with Load(url) as during:
            started = time.monotonic()
            deployed = run_fabula("deploy", ENV, "--serial", cwd=app, state_dir=state, timeout=1200)
            seconds = time.monotonic() - started
        assert deployed.returncode == 0, deployed.stderr
        return {"webs": webs, "deploy_s": round(seconds, 1), "baseline": base_figures,
                "during": during.figures(seconds)}
    finally:
        run_fabula("destroy", ENV, "--yes", cwd=app, state_dir=state, timeout=600)


AUTOSCALING = ("    autoscaling: {min: 1, desired: 1, max: 2, metric: requests, target: 4, scale_out_cooldown: 0, "
               "scale_in_cooldown: 600, health_grace: 3, interval: 1, window: 3}\n")


def web_health(state: Path, app: Path) -> dict[str, str]:
    report = json.loads(run_fabula("describe", ENV, "--json", cwd=app, state_dir=state).stdout)
    return {s["name"]: s["lb"] for s in report["servers"] if s["role"] == "web"}


def wait_until(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise SystemExit(f"condition not met within {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - started


def autoscaling_scenario(base: Path) -> dict:
    project = f"bscale-{secrets.token_hex(2)}"
    https = free_port()
    app = make_app_repo(base / project, project, ENV, https, free_port(),
                        servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 0}", extra=AUTOSCALING)
    state, url = base / "state", f"https://127.0.0.1:{https}"
    try:
        assert run_fabula("create", ENV, cwd=app, state_dir=state, timeout=1200).returncode == 0
        first = set(web_health(state, app))
        with Load(url):  # 4 clients: far above 4 requests/s for one server
            step = wait_until(lambda: sum(v == "UP" for v in web_health(state, app).values()) == 2, 120)
        new = sorted(set(web_health(state, app)) - first)
        victim = sorted(web_health(state, app))[0]
        pids = subprocess.run(["ip", "netns", "pids", f"fab.{project}.{ENV}.{victim}"], capture_output=True,
                              text=True).stdout.split()
        subprocess.run(["kill", "-9", *pids], check=True)
        healed = wait_until(lambda: victim not in (h := web_health(state, app)) and
                            sum(v == "UP" for v in h.values()) == 2, 180)
        return {"load_step_to_new_server_s": round(step, 1), "new_server": new,
                "death_to_replacement_s": round(healed, 1), "killed": victim}
    finally:
        run_fabula("destroy", ENV, "--yes", cwd=app, state_dir=state, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webs", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/deploy.py needs root (the local provider makes network namespaces)")
    base = Path(tempfile.mkdtemp(prefix="fabula-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        results = [scenario(base, n) for n in args.webs]
        scaling = autoscaling_scenario(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    table = Table(title=f"serial deploy under load ({CLIENTS} clients, GET /api/info through the load balancer)")
    for column in ("web servers", "deploy s", "requests", "failed", "p50 ms (no deploy)", "p50 ms (deploy)",
                   "p99 ms (no deploy)", "p99 ms (deploy)", "p99 ratio"):
        table.add_column(column, justify="right")
    for r in results:
        b, d = r["baseline"], r["during"]
        table.add_row(str(r["webs"]), str(r["deploy_s"]), str(d["requests"]), str(d["failed"]), str(b["p50_ms"]),
                      str(d["p50_ms"]), str(b["p99_ms"]), str(d["p99_ms"]),
                      f"{d['p99_ms'] / b['p99_ms']:.2f}" if b["p99_ms"] else "-")
    Console(width=160).print(table)
    print(f"autoscaling: load step -> new server taking traffic {scaling['load_step_to_new_server_s']} s; "
          f"web server killed -> replacement taking traffic {scaling['death_to_replacement_s']} s")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "deploy.json").write_text(json.dumps({"deploys": results, "autoscaling": scaling}, indent=2))


if __name__ == "__main__":
    main()
