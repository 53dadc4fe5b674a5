"""Per-command latency of the ssh provider's transport, side by side in one run: fabula's pool
(asyncssh, one connection per host), OpenSSH's client with a new connection per command, OpenSSH
through a ControlMaster, and the local provider's `ip netns exec` for reference. On a lab of hosts
(tests/sshlab.py: network namespaces, each running its own sshd).

With `--environment`, then the 7-host environment of the sample app on such a lab (its hosts
reach the package index through a NAT): `fabula create` (first, then again: nothing to change),
a release built on this machine against one built on the worker host (`ssh.build: worker`), and
a serial deploy under load (two clients through the load balancer: requests served and failed).

    sudo .venv/bin/python bench/ssh.py [--commands 200] [--environment]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fabula.providers.ssh.transport import SshPool, ssh_argv  # noqa: E402
from fabula.sample import RequestLoad, SampleEnvironment, commit_files  # noqa: E402
from tests.sshlab import ROLES, sample_environment, ssh_lab  # noqa: E402

ENV = "prod"


def timed(action, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def seconds_of(env: SampleEnvironment, *args: str) -> float:
    started = time.monotonic()
    result = env.fabula(*args, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"`fabula {' '.join(args)}` failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def environment_figures() -> None:
    rows: list[tuple[str, str]] = []
    with ssh_lab(len(ROLES), outside=True) as lab, sample_environment(lab, "bssh", ENV) as env:
        app = env.app_dir
        first = seconds_of(env, "create", ENV)
        rows.append(("create, first (its release built on this machine)", f"{first:.1f} s"))
        rows.append(("create, again (nothing to change)", f"{seconds_of(env, 'create', ENV):.1f} s"))
        for n, (where, what) in enumerate((
                ("auto", "release build on this machine (wheel cache warm from create's)"),
                ("worker", "release build on worker1, its first there (uv installed, wheel cache cold)"),
                ("worker", "release build on worker1 again (wheel cache warm)"))):
            config = app / "fabula.yml"
            config.write_text(config.read_text().replace("build: auto", f"build: {where}")
                              .replace("build: worker", f"build: {where}"))
            commit_files(app, f"build {n}", {"CHANGES.txt": f"{n}\n"})
            rows.append((what, f"{seconds_of(env, 'release', 'build', ENV):.1f} s"))
        commit_files(app, "a change to deploy", {"CHANGES.txt": "deployed\n"})
        seconds_of(env, "release", "build", ENV)   # the build is not the deploy
        with RequestLoad(env.url) as load:
            time.sleep(2)
            started = time.monotonic()
            took = seconds_of(env, "deploy", ENV, "--serial")
            failed, served = load.between(started, time.monotonic())
        rows.append(("serial deploy under load (2 web hosts, in place)", f"{took:.1f} s, {served} requests, "
                                                                        f"{failed} failed"))
    print(f"\n{'the 7-host environment (sample app)':<76} figure")
    for name, figure in rows:
        print(f"{name:<76} {figure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--environment", action="store_true", help="then the 7-host environment's figures")
    args = parser.parse_args()
    n = args.commands
    rows = []
    with ssh_lab(8) as lab, SshPool() as pool:
        target = lab.target(0)
        host = pool.host("h0", "web", target, PurePosixPath("/"))
        host.check(["true"])   # the connection made
        rows.append(("fabula's pool (asyncssh), one host", timed(lambda: host.check(["true"]), n)))
        hosts = [pool.host(f"h{i}", "web", lab.target(i), PurePosixPath("/")) for i in range(8)]
        for h in hosts:
            h.check(["true"])
        with ThreadPoolExecutor(8) as threads:
            def eight() -> None:
                list(threads.map(lambda h: h.check(["true"]), hosts))
            rows.append(("fabula's pool, 8 hosts at once (per round)", timed(eight, n // 4)))
        base = ssh_argv(target, tty=False)[:-1]   # without the address: options go before it
        rows.append(("OpenSSH, a connection per command",
                     timed(lambda: subprocess.run([*base, "-o", "BatchMode=yes", target.address, "true"],
                                                  check=True, capture_output=True), max(n // 10, 10))))
        with tempfile.TemporaryDirectory() as tmp:
            control = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp}/cm", "-o", "ControlPersist=60"]
            subprocess.run([*base, *control, target.address, "true"], check=True, capture_output=True)
            rows.append(("OpenSSH through a ControlMaster",
                         timed(lambda: subprocess.run([*base, *control, target.address, "true"], check=True,
                                                      capture_output=True), n)))
            subprocess.run([*base, *control, "-O", "exit", target.address], capture_output=True)
        rows.append(("local provider: ip netns exec",
                     timed(lambda: subprocess.run(["ip", "netns", "exec", lab.namespaces[0], "true"], check=True),
                           n)))
    ours = statistics.median(rows[0][1])
    print(f"{'transport':<46} {'median':>9} {'p95':>9} {'vs pool':>8}")
    for name, times in rows:
        median = statistics.median(times)
        p95 = sorted(times)[int(len(times) * 0.95) - 1]
        print(f"{name:<46} {median * 1000:>7.1f}ms {p95 * 1000:>7.1f}ms {median / ours:>7.1f}x")
    if args.environment:
        environment_figures()


if __name__ == "__main__":
    main()
