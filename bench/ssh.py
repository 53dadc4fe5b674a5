"""Per-command latency of the ssh provider's transport, side by side in one run: fabula's pool
(asyncssh, one connection per host), OpenSSH's client with a new connection per command, OpenSSH
through a ControlMaster, and the local provider's `ip netns exec` for reference. On a lab of hosts
(tests/sshlab.py: network namespaces, each running its own sshd).

    sudo .venv/bin/python bench/ssh.py [--commands 200]
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
from tests.sshlab import ssh_lab  # noqa: E402


def timed(action, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200)
    n = parser.parse_args().commands
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


if __name__ == "__main__":
    main()
