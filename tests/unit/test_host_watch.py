"""fabula's program on a fixed inventory (autoscaling/hosts.py): a host that stops answering is
down after DOWN_AFTER rounds, recorded once; when it answers again it is brought back, and a
fenced former primary is left as it is."""
from __future__ import annotations

import socket
import threading

from fabula.autoscaling.hosts import DOWN_AFTER, HostWatch, answers, bring_back
from fabula.state import ServerRecord
from fabula.testing import FakeHost


def test_a_host_is_down_after_missed_rounds_recorded_once_and_brought_back_when_it_answers():
    watch = HostWatch()
    for _ in range(DOWN_AFTER - 1):   # a blip is not a dead host
        assert watch.observe({"web1": False, "db1": True}) == ([], [])
    assert watch.observe({"web1": False, "db1": True}) == (["web1"], [])
    watch.recorded.add("web1")   # (the controller does, once the history holds it)
    assert watch.observe({"web1": False, "db1": True}) == ([], [])
    assert watch.observe({"web1": True, "db1": True}) == ([], ["web1"])
    watch.forget("web1")   # (once brought back)
    assert watch.observe({"web1": True, "db1": True}) == ([], [])
    # a host no longer in the inventory is no longer watched
    for _ in range(DOWN_AFTER):
        watch.observe({"web1": True, "db1": False})
    watch.observe({"web1": True})
    assert "db1" not in watch.down and "db1" not in watch.misses


def test_a_host_answers_when_its_sshd_greets():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def greet() -> None:
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.close()
    threading.Thread(target=greet, daemon=True).start()
    assert answers("127.0.0.1", port)
    server.close()
    assert not answers("127.0.0.1", port, timeout=0.5)   # nothing listens any more


def test_a_fenced_former_primary_is_not_started_again(tmp_path):
    from types import SimpleNamespace
    host = FakeHost("db1", "db-replica", "10.0.0.4")
    record = ServerRecord("db1", "db-replica", address="10.0.0.4", rebuild=True)
    ctx = SimpleNamespace(state=SimpleNamespace(servers={"db1": record}), host=lambda name: host)
    done = bring_back(ctx, "db1")
    assert done["restarted"] is False and "reset-replicas" in done["why"]
    assert host.calls == []   # nothing ran on it: its PostgreSQL must not start as a primary
