"""The environment's lock and history, as a user of `fabula` meets them: a second command is
refused with the holder's name, a crashed holder's lock is taken over, every operation leaves
one record of how it went."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from fabula.config import load_config
from fabula.context import Context
from fabula.environment import history, lock
from fabula.environment.audit import operation
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.state import EnvPaths, EnvState
from tests.helpers import REPO, run_fabula, wait_for
from tests.unit.test_config import VALID

# a second fabula process holding the lock until its stdin is closed
HOLDER = """
import sys
from pathlib import Path
from fabula.environment.audit import operation
from fabula.output import Output
from tests.unit.test_deploy_lock import make_context
ctx = make_context(Path(sys.argv[1]))
ctx.out = Output(quiet=True)  # its warnings on its stderr, as a user would see them
with operation(ctx, "create", command="fabula create testing"):
    sys.stdin.read()
"""


def make_context(base: Path) -> Context:
    """A context on a temporary state directory, with a provider that only says its environment is
    not shared: enough for locks and history."""
    config_path = base / "fabula.yml"
    if not config_path.exists():
        config_path.write_text(VALID)
    paths = EnvPaths(base / "state", "polls", "testing")
    out = Output(quiet=True, err_console=Console(file=io.StringIO(), width=400))
    return Context(config=load_config(config_path), env_name="testing", env=None, paths=paths,
                   state=EnvState(project="polls", env="testing"), out=out,
                   provider=SimpleNamespace(shared_store=lambda: None))


def warnings(ctx: Context) -> str:
    return ctx.out.err.file.getvalue()


@pytest.fixture
def ctx(tmp_path) -> Context:
    return make_context(tmp_path)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the environment's lock; stopped (and waited for) afterwards."""
    paths = make_context(tmp_path).paths
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or (lock.report(paths) or {}).get("pid") == proc.pid,
                 timeout=30, message="the other process to take the lock")
        assert proc.poll() is None, proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def test_a_held_lock_refuses_a_second_command_naming_the_holder(ctx, holder):
    with pytest.raises(FabulaError) as refused:
        with operation(ctx, "release build"):
            pytest.fail("ran while another process held the lock")
    message = str(refused.value)
    assert f"environment testing is locked by {lock.owner()} (pid {holder.pid}, since " in message
    assert "`fabula create testing`" in message
    assert "fix:" in message and "`fabula unlock testing`" in message
    report = lock.report(ctx.paths)
    assert (report["pid"], report["command"], report["stale"]) == (holder.pid, "fabula create testing", False)


def test_the_lock_is_released_when_the_holder_ends(ctx, holder):
    holder.communicate(timeout=30)  # closes its stdin: it ends its operation
    assert holder.returncode == 0
    assert lock.report(ctx.paths) is None
    with operation(ctx, "release build"):
        assert lock.report(ctx.paths)["pid"] == os.getpid()
    assert [r["outcome"] for r in history.read(ctx.paths)[0]] == ["ok", "ok"]


def test_a_lock_left_by_a_killed_process_is_stale_and_taken_over_with_a_warning(ctx, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock.report(ctx.paths)["stale"] is True
    with operation(ctx, "create"):
        pass
    assert "taking over the stale lock of environment testing" in warnings(ctx)
    assert f"pid {holder.pid} has ended" in warnings(ctx)
    dead, mine = history.read(ctx.paths)[0]
    assert (dead["command"], dead["outcome"]) == ("fabula create testing", "interrupted")
    assert f"pid {holder.pid} ended without releasing the lock" in dead["error"]
    assert mine["outcome"] == "ok" and lock.report(ctx.paths) is None


def test_a_reused_pid_does_not_keep_a_lock_alive(ctx):
    me = lock.Holder.of_this_process("create", "fabula create testing")
    assert not me.is_stale()
    assert replace(me, pid_start="1").is_stale()           # same pid, another process
    assert not replace(me, host="elsewhere", pid=999999999).is_stale()  # cannot be checked from here


def test_fabula_unlock_breaks_a_lock_and_says_whose_it_was(ctx, holder, tmp_path):
    result = run_fabula("unlock", "testing", cwd=tmp_path, state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert f"broke the lock of environment testing held by {lock.owner()} (pid {holder.pid}" in result.stdout
    assert f"pid {holder.pid} is still running" in result.stderr
    assert lock.report(ctx.paths) is None
    with operation(ctx, "create"):
        pass
    again = run_fabula("unlock", "testing", cwd=tmp_path, state_dir=tmp_path / "state")
    assert again.returncode == 0 and "environment testing is not locked" in again.stdout
    # the holder, ending, finds its lock broken: it says so and removes no one else's lock
    _, stderr = holder.communicate(timeout=30)
    assert "was broken while this command ran" in stderr
    actions = [(r["action"], r["outcome"]) for r in history.read(ctx.paths)[0]]
    assert actions == [("unlock", "ok"), ("create", "ok"), ("create", "ok")]
    assert history.read(ctx.paths)[0][0]["details"]["broken"]["pid"] == holder.pid


def test_a_failed_operation_is_recorded_with_its_phases_and_error_and_releases_the_lock(ctx):
    with pytest.raises(FabulaError):
        with operation(ctx, "create", command="fabula create testing") as op:
            op.details.update(from_release=None, to_release="abc")
            with op.phase("servers"):
                pass
            with op.phase("web"):
                raise FabulaError("web1: nginx did not start", "see `fabula logs testing web1`")
    assert lock.report(ctx.paths) is None
    [record] = history.read(ctx.paths)[0]
    assert (record["action"], record["command"], record["outcome"]) == ("create", "fabula create testing", "failed")
    assert record["error"] == "web1: nginx did not start"
    assert [(p["name"], p["outcome"]) for p in record["phases"]] == [("servers", "ok"), ("web", "failed")]
    assert all(p["seconds"] >= 0 for p in record["phases"]) and record["seconds"] >= 0
    assert record["details"] == {"from_release": None, "to_release": "abc"}
    assert record["who"] == lock.owner() and record["started"] <= record["ended"]


def test_ctrl_c_is_recorded_as_interrupted_and_releases_the_lock(ctx):
    with pytest.raises(KeyboardInterrupt):
        with operation(ctx, "create") as op:
            with op.phase("servers"):
                raise KeyboardInterrupt
    [record] = history.read(ctx.paths)[0]
    assert record["outcome"] == "interrupted" and record["phases"][0]["outcome"] == "interrupted"
    assert lock.report(ctx.paths) is None


def test_an_operation_within_an_operation_of_the_same_process_shares_its_lock(ctx):
    with operation(ctx, "restore"):
        with operation(ctx, "create"):
            pass
        assert lock.report(ctx.paths)["command"]  # still held by the outer one
    assert lock.report(ctx.paths) is None
    assert [r["action"] for r in history.read(ctx.paths)[0]] == ["create", "restore"]


def test_fabula_history_shows_the_last_operations_newest_last(ctx, tmp_path):
    for n in range(3):
        with operation(ctx, "release build", command=f"fabula release build testing --rev v{n}") as op:
            with op.phase("code+virtualenv+static"):
                pass
    with open(history.history_path(ctx.paths), "a") as torn:
        torn.write('{"id": "half a li')  # as a crash mid-write would leave it
    result = run_fabula("history", "testing", "--json", "-n", "2", cwd=tmp_path, state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert [r["command"] for r in json.loads(result.stdout)] == [
        "fabula release build testing --rev v1", "fabula release build testing --rev v2"]
    assert "1 unreadable line(s)" in result.stderr
    table = run_fabula("history", "testing", cwd=tmp_path, state_dir=tmp_path / "state")
    assert table.returncode == 0, table.stderr
    assert table.stdout.index("--rev v0") < table.stdout.index("--rev v2")
    assert "code+virtualenv+static" in table.stdout


def test_describe_shows_who_holds_the_lock(ctx, holder, tmp_path):
    ctx.state.save(ctx.paths)  # an environment that exists, with no servers yet
    report = run_fabula("describe", "testing", "--json", cwd=tmp_path, state_dir=tmp_path / "state")
    assert report.returncode == 0, report.stderr
    held = json.loads(report.stdout)["lock"]
    assert (held["owner"], held["pid"], held["command"]) == (lock.owner(), holder.pid, "fabula create testing")
    table = run_fabula("describe", "testing", cwd=tmp_path, state_dir=tmp_path / "state")
    assert f"locked by {lock.owner()} (pid {holder.pid}, since" in table.stdout


def test_the_lock_and_the_history_are_readable_by_root_only(ctx):
    with operation(ctx, "create"):
        assert lock.lock_path(ctx.paths).stat().st_mode & 0o777 == 0o600
    path = history.history_path(ctx.paths)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)  # as an older fabula left it
    with operation(ctx, "create"):
        pass
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_history_is_never_written_through_a_symlink(ctx, tmp_path):
    ctx.paths.make_env_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    history.history_path(ctx.paths).symlink_to(elsewhere)
    with pytest.raises(OSError):
        history.append(ctx.paths, {"id": "x"})
    assert elsewhere.read_text() == ""


def test_an_operation_can_fail_without_an_exception(ctx):
    with operation(ctx, "manage") as op:
        op.fail("manage.py exited with 3")
    [record] = history.read(ctx.paths)[0]
    assert (record["outcome"], record["error"]) == ("failed", "manage.py exited with 3")


class FakeProvider:
    """What destroy asks of a provider, without namespaces."""

    def __init__(self):
        self.destroyed = 0

    def check_prerequisites(self) -> None:
        pass

    def shared_store(self) -> None:
        return None

    def destroy(self) -> list[str]:
        self.destroyed += 1
        return ["server web1"]


def test_destroy_is_refused_while_another_command_holds_the_lock_naming_it_and_the_fix(ctx, holder):
    from fabula.operations.destroy import destroy
    ctx.provider = FakeProvider()
    ctx.state.save(ctx.paths)
    with pytest.raises(FabulaError) as refused:
        destroy(ctx)
    message = str(refused.value)
    assert f"locked by {lock.owner()} (pid {holder.pid}" in message and "`fabula create testing`" in message
    assert "`fabula destroy testing --yes --force`" in refused.value.hint
    assert ctx.provider.destroyed == 0 and ctx.paths.state_file.exists()


def test_destroy_force_breaks_a_live_lock_and_records_whose_it_was(ctx, holder):
    from fabula.operations.destroy import destroy
    ctx.provider = FakeProvider()
    ctx.state.save(ctx.paths)
    (ctx.paths.env_dir / "servers" / "web1").mkdir(parents=True)
    destroy(ctx, force=True)
    assert f"breaking the lock of environment testing held by {lock.owner()} (pid {holder.pid}" in warnings(ctx)
    assert not ctx.paths.env_dir.exists()  # lock included: released without bringing the directory back
    records = history.read(ctx.paths)[0]  # kept beside the directory, which is gone
    assert [(r["action"], r["outcome"]) for r in records] == [("break lock", "ok"), ("destroy", "ok")]
    assert records[0]["details"]["broken"]["pid"] == holder.pid
    # the holder, ending, finds its lock gone: it warns, and neither brings the directory back
    _, stderr = holder.communicate(timeout=30)
    assert "environment testing was destroyed while this command ran" in stderr
    assert not ctx.paths.env_dir.exists()
    assert [r["action"] for r in history.read(ctx.paths)[0]] == ["break lock", "destroy", "create"]


def test_destroy_takes_over_the_lock_of_a_killed_create_and_leaves_its_record(ctx, holder):
    from fabula.operations.destroy import destroy
    ctx.provider = FakeProvider()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    destroy(ctx)
    assert not ctx.paths.env_dir.exists()
    assert [(r["action"], r["outcome"]) for r in history.read(ctx.paths)[0]] == [
        ("create", "interrupted"), ("destroy", "ok")]


def test_a_failed_destroy_keeps_the_directory_and_releases_the_lock(ctx):
    from fabula.operations.destroy import destroy

    class Failing(FakeProvider):
        def destroy(self):
            raise FabulaError("destroy could not remove fab.polls.testing.db1")

    ctx.provider = Failing()
    ctx.state.save(ctx.paths)
    with pytest.raises(FabulaError):
        destroy(ctx)
    assert ctx.paths.state_file.exists() and lock.report(ctx.paths) is None
    assert history.read(ctx.paths)[0][-1]["outcome"] == "failed"


def test_a_command_that_finds_the_directory_destroyed_meanwhile_starts_afresh(ctx, monkeypatch):
    from fabula.environment import audit
    real = audit._acquire
    calls = []

    def destroyed_first(ctx_, holder_, force_):
        if not calls:
            calls.append(1)
            ctx_.paths.env_dir.rmdir()  # as a destroy ending just then leaves it
            raise FileNotFoundError(ctx_.paths.env_dir)
        return real(ctx_, holder_, force_)

    monkeypatch.setattr(audit, "_acquire", destroyed_first)
    with operation(ctx, "create"):
        assert lock.report(ctx.paths)["pid"] == os.getpid()


class BusyStore:
    """A team's shared store whose lock is held by the holders `busy` names, one acquire each."""

    def __init__(self, busy: list[dict]):
        self.busy, self.asked = list(busy), 0

    def acquire(self, holder: dict) -> dict | None:
        self.asked += 1
        return self.busy.pop(0) if self.busy else None

    def release(self) -> None:
        pass

    def interrupted(self) -> dict | None:
        return None

    def pull(self, files) -> None:
        pass


def test_a_command_waits_for_the_change_of_fabulas_program_on_the_hosts_but_not_for_another_command(tmp_path,
                                                                                                   monkeypatch):
    from fabula.environment import sharing

    monkeypatch.setattr(sharing.time, "sleep", lambda seconds: None)
    ctx = SimpleNamespace(out=Output(quiet=True), paths=EnvPaths(tmp_path, "p", "e"), env_name="e")
    program = {"id": "a1", "owner": "root@lb1", "action": "autoscale", "command": "fabula autoscaler e (host back)"}
    store = BusyStore([program, program])
    holder = lock.Holder.of_this_process("deploy", "fabula deploy e")
    sharing.take(ctx, store, holder, {"action": "deploy"}, autoscaler="autoscale", wait=60)
    assert store.asked == 3   # taken once the program's change was over
    other = {**program, "action": "deploy", "command": "fabula deploy e"}
    with pytest.raises(FabulaError, match="locked by"):
        sharing.take(ctx, BusyStore([other]), holder, {"action": "deploy"}, autoscaler="autoscale", wait=60)
