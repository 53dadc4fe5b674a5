"""The ssh transport against real sshd processes, each in a namespace of its own (conftest.py): what
a provider built on it observes."""
from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pytest

from fabula.errors import CommandFailed, FabulaError
from fabula.providers.base import SYSTEM_PATH, FileState
from fabula.providers.ssh import transport
from fabula.providers.ssh.transport import SshHost, SshPool, SshUnreachable, ssh_argv
from tests.helpers import wait_for
from tests.sshlab import AWKWARD_PORT, AWKWARD_SESSIONS, HOSTS, NOISE, Lab

pytestmark = pytest.mark.e2e


@pytest.fixture
def pool() -> Iterator[SshPool]:
    with SshPool() as made:
        yield made


def host(pool: SshPool, lab: Lab, i: int = 0, **target) -> SshHost:
    return pool.host(f"host{i}", "web", lab.target(i, **target), PurePosixPath(lab.tmp))


def unique_sleep() -> str:
    """A `sleep` argument no other process has, to find the command's process by."""
    return f"{60 + secrets.randbelow(10**6) / 10**6:.6f}"


def test_run_returns_exit_status_and_both_streams(lab, pool):
    h = host(pool, lab)
    result = h.run(["sh", "-c", 'echo "out $1"; echo err >&2; exit 7', "sh", "it's $HOME `id` *"])
    assert (result.returncode, result.stdout, result.stderr) == (7, "out it's $HOME `id` *\n", "err\n")
    assert h.run(["no-such-command-here"]).returncode == 127
    assert h.run(["sh", "-c", "kill -9 $$"]).returncode == -9
    assert h.check(["true"]).ok
    with pytest.raises(CommandFailed, match="exited with 1"):
        h.check(["false"])


def test_input_reaches_the_command_on_stdin(lab, pool):
    h = host(pool, lab)
    assert h.run(["cat"], input="line 1\nline 2").stdout == "line 1\nline 2"
    big = secrets.token_hex(512 * 1024)   # 1 MB: more than any buffer on the way
    result = h.run(["sha256sum"], input=big, env={"A": "x"})
    assert result.stdout.split()[0] == hashlib.sha256(big.encode()).hexdigest()


def test_env_reaches_the_command_and_never_a_command_line(lab, pool):
    h = host(pool, lab)
    tricky = "it's \"quoted\" $(id) `id` \\ é\nsecond line\n"
    assert h.run(["printenv", "TRICKY"], env={"TRICKY": tricky}).stdout == tricky + "\n"
    # exactly the base and `env`: nothing of sshd's own (SSH_CONNECTION, USER...)
    names = {line.split("=", 1)[0] for line in h.run(["env"], env={"MINE": "1"}).stdout.splitlines()}
    assert names == {"PATH", "LANG", "HOME", "MINE"}
    assert h.run(["printenv", "PATH"]).stdout.strip() == SYSTEM_PATH

    secret, probe = f"secret-{secrets.token_hex(8)}", unique_sleep()
    with ThreadPoolExecutor(1) as threads:
        running = threads.submit(h.run, ["sleep", probe], env={"FABULA_TEST_SECRET": secret}, timeout=90)
        pid = wait_for(lambda: lab.processes(f"sleep\0{probe}"), 15, message="the sleep running")[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        seen = lab.processes(secret)
        os.kill(pid, signal.SIGKILL)
        assert running.result(30).returncode == -9
    assert f"FABULA_TEST_SECRET={secret}".encode() in environ
    assert seen == []


def test_commands_run_as_another_user(lab, pool, user):
    h = host(pool, lab)
    result = h.run(["sh", "-c", 'id -un; id -gn; echo "$HOME"; touch "$HOME/made"'], user=user)
    assert result.stdout.split() == [user, user, str(lab.tmp / user)], result.stderr
    assert h.stat(PurePosixPath(lab.tmp / user / "made")).owner == user
    missing = h.run(["true"], user="no-such-user-here")
    assert missing.returncode == 125 and "no user no-such-user-here" in missing.stderr


def test_a_noisy_login_shell_changes_no_output(lab, pool):
    # the harness's rc file really is read and noisy on that port (the OpenSSH client shows it)...
    target = lab.target(0, port=AWKWARD_PORT)
    plain = subprocess.run([*ssh_argv(target, tty=False), "echo", "plain"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
    assert NOISE in plain.stdout and NOISE in plain.stderr
    # ... and the transport's output is the command's own
    h = host(pool, lab, port=AWKWARD_PORT)
    result = h.run(["printf", "exact"])
    assert (result.stdout, result.stderr) == ("exact", "")
    path = PurePosixPath(lab.tmp / "noisy-file")
    h.write(path, b"\x00binary\xff", mode=0o600, owner="root")
    assert h.read(path) == b"\x00binary\xff"
    assert h.stat(path) == FileState(0o600, "root")


@pytest.mark.parametrize("script", ["sleep {probe}; echo never",
                                    'trap "" TERM; sleep {probe}; echo never'])   # needs the KILL
def test_a_timeout_returns_124_and_leaves_no_process(lab, pool, script):
    probe = unique_sleep()
    result = host(pool, lab).run(["sh", "-c", script.format(probe=probe)], timeout=1)
    assert result.returncode == 124 and "never" not in result.stdout
    assert "timed out after 1s" in result.stderr
    wait_for(lambda: not lab.processes(f"sleep\0{probe}"), 10, message="no sleep left")


def test_a_host_that_stops_answering_times_out_on_the_client(lab, pool):
    h = host(pool, lab, 1)
    assert h.run(["true"]).ok
    probe = unique_sleep()
    sshd = [pid for pid in subprocess.run(["ip", "netns", "pids", lab.namespaces[1]], capture_output=True,
                                          text=True).stdout.split()
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"]
    try:
        for pid in sshd:
            os.kill(int(pid), signal.SIGSTOP)
        result = h.run(["sleep", probe], timeout=0.5)
    finally:
        for pid in sshd:
            os.kill(int(pid), signal.SIGCONT)
    assert result.returncode == 124 and "no answer" in result.stderr
    wait_for(lambda: not lab.processes(f"sleep\0{probe}"), 10, message="no sleep left")
    assert h.run(["true"]).ok


def test_write_read_stat_round_trip(lab, pool, user):
    h = host(pool, lab)
    path = PurePosixPath(lab.tmp / "files" / "sub" / "config")
    assert h.read(path) is None and h.stat(path) is None
    h.write(path, b"first\n", mode=0o640, owner=user)
    assert h.read(path) == b"first\n"
    assert h.stat(path) == FileState(0o640, user)
    local = os.stat(path)   # the namespaces share this machine's files: the group is the owner's
    ids = h.run(["sh", "-c", 'id -u "$1"; id -g "$1"', "sh", user]).stdout.split()
    assert [local.st_uid, local.st_gid] == [int(i) for i in ids]
    h.write(path, b"second", mode=0o600, owner="root")
    assert (h.read(path), h.stat(path)) == (b"second", FileState(0o600, "root"))
    assert os.listdir(Path(path).parent) == ["config"]   # no temporary file left beside
    assert h.put_file(path, "second", mode=0o600) is False


def test_copy_tree_copies_a_tree_in_one_stream(lab, pool, tmp_path):
    tree = tmp_path / "release"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "run").write_text("#!/bin/sh\necho run\n")
    (tree / "bin" / "run").chmod(0o755)
    (tree / "secret").write_text("s")
    (tree / "secret").chmod(0o600)
    (tree / "link").symlink_to("bin/run")
    tree.chmod(0o755)
    h, dest = host(pool, lab), PurePosixPath(lab.tmp / "releases" / "r1")
    h.copy_tree(tree, dest)
    assert h.run([str(dest / "link")]).stdout == "run\n"
    assert h.stat(dest / "secret") == FileState(0o600, "root")
    assert h.stat(dest / "bin" / "run") == FileState(0o755, "root")
    assert h.stat(dest) == FileState(0o755, "root")
    assert sorted(os.listdir(Path(dest).parent)) == ["r1"]
    with pytest.raises(CommandFailed, match="already exists"):
        h.copy_tree(tree, dest)


def test_push_and_fetch_a_large_file(lab, pool, user, tmp_path):
    h, remote = host(pool, lab), PurePosixPath(lab.tmp / "backups" / "dump")
    original = tmp_path / "original"
    original.write_bytes(os.urandom(5 * 1024 * 1024))
    h.push(original, remote, mode=0o640, owner=user)
    assert h.stat(remote) == FileState(0o640, user)
    back = tmp_path / "back"
    h.fetch(remote, back)
    assert back.read_bytes() == original.read_bytes()
    with pytest.raises(FileNotFoundError):
        h.fetch(PurePosixPath(lab.tmp / "no-such-dump"), tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == ["back", "original"]


def test_a_restarted_sshd_is_reconnected(lab, pool):
    h = host(pool, lab, 2)
    assert h.run(["true"]).ok
    lab.kill_all(2)
    lab.start_sshd(2)
    assert h.run(["echo", "again"]).stdout == "again\n"
    # a command the lost connection interrupts is not run again: its outcome is unknown
    probe = unique_sleep()
    with ThreadPoolExecutor(1) as threads:
        running = threads.submit(h.run, ["sleep", probe])
        wait_for(lambda: lab.processes(f"sleep\0{probe}"), 15, message="the sleep running")
        lab.kill_all(2)
        with pytest.raises(SshUnreachable, match="may or may not have completed"):
            running.result(30)
    lab.start_sshd(2)
    assert h.run(["true"]).ok


def test_a_wrong_or_unknown_host_key_is_refused(lab, pool, tmp_path):
    flag = lab.tmp / f"ran-{secrets.token_hex(4)}"
    wrong = tmp_path / "known_hosts"
    other_key = (lab.tmp / "host1" / "host_ed25519.pub").read_text().split()[:2]
    wrong.write_text(f"{lab.address(0)} {' '.join(other_key)}\n")
    h = host(pool, lab, 0, known_hosts=wrong)
    with pytest.raises(FabulaError) as refused:
        h.run(["touch", str(flag)])
    message = str(refused.value)
    assert "host0" in message and lab.address(0) in message and "differs" in message
    assert "fix: " in message and "ssh-keygen -R" in message
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(FabulaError, match="is not in"):
        host(pool, lab, 0, known_hosts=empty).run(["touch", str(flag)])
    assert not flag.exists()


def test_many_hosts_connect_and_run_in_parallel(lab, pool, monkeypatch):
    starting, most = 0, 0
    connect = transport.asyncssh.connect

    async def counted(*args, **kwargs):
        nonlocal starting, most
        starting += 1
        most = max(most, starting)
        try:
            return await connect(*args, **kwargs)
        finally:
            starting -= 1

    monkeypatch.setattr(transport.asyncssh, "connect", counted)
    hosts = [host(pool, lab, i) for i in range(HOSTS)]
    with ThreadPoolExecutor(HOSTS) as threads:
        results = list(threads.map(lambda h: h.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]), hosts))
    assert [f" {lab.address(i)}/24 " in r.stdout for i, r in enumerate(results)] == [True] * HOSTS
    assert 1 < most <= 8   # sshd's MaxStartups drops connections beyond 10 starting at once


def without_children(pids: list[int]) -> list[int]:
    """Those of `pids` whose parent is not one of them."""
    def parent(pid: int) -> int | None:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
    return [pid for pid in pids if parent(pid) not in pids]


def test_channels_per_connection_stay_within_the_limit(lab, pool):
    h, token, most = host(pool, lab, 3), f"fbssh-{secrets.token_hex(4)}", 0
    with ThreadPoolExecutor(25) as threads:
        running = [threads.submit(h.run, ["sh", "-c", f"sleep 0.5; echo {i}", token]) for i in range(25)]
        while not all(r.done() for r in running):
            # not `timeout` (its parent), nor the copy of an `sh` forked to run `sleep` that has not
            # exec'd it yet (same name and command line: under load the scan can see both)
            most = max(most, len(without_children(lab.processes(token, comm="sh", at_once=True))))
    assert [r.result().stdout for r in running] == [f"{i}\n" for i in range(25)]
    assert 1 < most <= 10   # sshd's default MaxSessions


def test_a_host_allowing_fewer_sessions_makes_commands_wait_not_fail(lab, pool):
    h = host(pool, lab, 3, port=AWKWARD_PORT)
    with ThreadPoolExecutor(3 * AWKWARD_SESSIONS) as threads:
        results = list(threads.map(lambda i: h.run(["sh", "-c", f"sleep 0.2; echo {i}"]), range(3 * AWKWARD_SESSIONS)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(3 * AWKWARD_SESSIONS)]


def test_interactive_runs_the_openssh_client_with_env_off_the_command_line(lab, pool, user):
    h = host(pool, lab)
    out = lab.tmp / user / f"interactive-{secrets.token_hex(4)}"   # where the user may write
    code = h.interactive(["sh", "-c", 'printf %s "$V" >"$1"; id -un >>"$1"; exit 3', "sh", str(out)],
                         env={"V": "it's secret\n"}, user=user)
    assert code == 3
    assert out.read_text() == f"it's secret\n{user}\n"
    assert not [f for f in os.listdir("/run") if f.startswith("fabula-env.")]


def test_a_jump_host_reaches_the_hosts_behind_it(lab, pool):
    h = host(pool, lab, 4, jump=f"root@{lab.address(5)}")
    logged = len((lab.tmp / "host4" / "sshd.log").read_text())
    assert f" {lab.address(4)}/24 " in h.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    out = lab.tmp / f"jumped-{secrets.token_hex(4)}"
    assert h.interactive(["sh", "-c", 'ip -4 -o addr show dev eth0 >"$1"', "sh", str(out)]) == 0
    assert f" {lab.address(4)}/24 " in out.read_text()
    # both came from the jump host, not from this machine
    log = (lab.tmp / "host4" / "sshd.log").read_text()[logged:]
    assert log.count(f"Accepted publickey for root from {lab.address(5)} ") == 2
    assert "from 10.251" not in log.replace(f"from {lab.address(5)} ", "")

