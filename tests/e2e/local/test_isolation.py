"""Two environments on one machine cannot touch each other: the app of one, with every right its
own user has, cannot read the other's secrets (files or process environments), connect to its
database sockets, or reach its servers. And the machine's other users cannot go around the load
balancer to a web server."""
from __future__ import annotations

import shlex
import socket
import subprocess

import pytest

from fabula.sample import Run
from tests.e2e.local.conftest import Environment, running_environment

pytestmark = pytest.mark.e2e
SMALL = "{web: 1, worker: 0, cache: 1, db-primary: 1, db-replica: 0}"


@pytest.fixture(scope="module")
def pair():
    with running_environment("isa", servers=SMALL) as first, running_environment("isb", servers=SMALL) as second:
        yield first, second


def as_app(env: Environment, server: str, script: str):
    """A shell script run on `server` of `env` as that environment's app user."""
    return env.exec(server, "runuser", "-u", env.accounts.app, "--", "bash", "-c", script, timeout=60)


def pid_of(env: Environment, server: str, user: str) -> str:
    found = env.exec(server, "pgrep", "-o", "-u", user)
    assert found.returncode == 0, found.stderr
    return found.stdout.split()[0]


def reaches(env: Environment, server: str, address: str, port: int) -> bool:
    probe = as_app(env, server, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}'")
    return probe.returncode == 0


def address_of(env: Environment, role: str) -> str:
    return next(s["address"] for s in env.describe()["servers"] if s["role"] == role)


def test_each_environment_runs_its_services_as_users_of_its_own(pair):
    first, second = pair
    assert set(first.accounts.users().values()).isdisjoint(second.accounts.users().values())
    for env in pair:
        for server, user in (("web1", env.accounts.app), ("web1", env.accounts.db), ("db1", env.accounts.db),
                             ("cache1", env.accounts.cache)):
            pid_of(env, server, user)  # something runs as it


def test_the_app_cannot_read_the_other_environments_secrets(pair):
    first, second = pair
    secrets = second.env_dir / "secrets" / "secrets.json"
    assert secrets.exists()
    assert as_app(first, "web1", f"cat {shlex.quote(str(secrets))}").returncode != 0
    theirs = pid_of(second, "web1", second.accounts.app)  # their gunicorn: its environment holds their secrets
    assert as_app(first, "web1", f"cat /proc/{theirs}/environ").returncode != 0
    # ... while its own process environment is its own to read: the check above could succeed
    ours = pid_of(first, "web1", first.accounts.app)
    own = as_app(first, "web1", f"tr '\\0' '\\n' < /proc/{ours}/environ")
    assert own.returncode == 0 and "DJANGO_SECRET_KEY=" in own.stdout


def test_the_app_cannot_connect_to_the_other_environments_database_sockets(pair):
    first, second = pair
    sockets = {"pgbouncer": (second.env_dir / "servers" / "web1" / "run" / "pgbouncer", 6432),
               "postgresql": (second.env_dir / "servers" / "db1" / "run" / "postgresql", 5432)}
    for name, (folder, port) in sockets.items():
        tried = as_app(first, "web1", f"psql -X -h {shlex.quote(str(folder))} -p {port} -U postgres -d postgres "
                                      "-c 'SELECT 1'")
        assert tried.returncode != 0, f"{name}: {tried.stdout}"
        assert "Permission denied" in tried.stderr or "No such file" in tried.stderr, tried.stderr
    # nor to its own environment's PostgreSQL as the superuser: peer authentication admits only the
    # environment's database user
    own = first.env_dir / "servers" / "db1" / "run" / "postgresql"
    tried = as_app(first, "db1", f"psql -X -h {shlex.quote(str(own))} -U postgres -d postgres -c 'SELECT 1'")
    assert tried.returncode != 0


def test_only_the_apps_own_user_logs_in_to_its_pgbouncer_socket(pair):
    first, second = pair
    folder = first.env_dir / "servers" / "web1" / "run" / "pgbouncer"
    db = first.project.replace("-", "_")

    def login(env: Environment, user: str, as_role: str) -> Run:
        conninfo = f"host={folder} port=6432 dbname={db} user={as_role} connect_timeout=5"
        return env.exec("web1", "runuser", "-u", user, "--", "psql", "-X", "-w", "-Atc", "SELECT current_user",
                        conninfo, timeout=60)

    # the app's own user, without a password (peer): PgBouncer logs in to PostgreSQL as `app`
    own = login(first, first.accounts.app, first.accounts.app)
    assert own.returncode == 0 and own.stdout.strip() == "app", own.stderr
    # another user of the environment (its group reaches the socket's folder) is refused, whatever
    # user it asks to be; so is the app role's name without its password
    for user, role in ((first.accounts.web, first.accounts.web), (first.accounts.web, first.accounts.app),
                       (first.accounts.db, first.accounts.app), (first.accounts.app, "app")):
        tried = login(first, user, role)
        assert tried.returncode != 0 and "login rejected" in tried.stderr, (user, role, tried.stdout, tried.stderr)
    # the other environment's app user, as this app's user: not even the folder is open to it
    tried = login(second, second.accounts.app, first.accounts.app)
    assert tried.returncode != 0 and "Permission denied" in tried.stderr, tried.stderr


def test_the_app_cannot_reach_the_other_environments_servers(pair):
    first, second = pair
    # the check can succeed: the app reaches its own database and cache
    assert reaches(first, "web1", address_of(first, "db-primary"), 5432)
    assert reaches(first, "web1", address_of(first, "cache"), 6379)
    for role, port in (("db-primary", 5432), ("cache", 6379), ("web", 443)):
        assert not reaches(first, "web1", address_of(second, role), port), f"reached the other {role}"


def test_servers_open_only_the_connections_their_role_needs(pair):
    first, _ = pair
    gateway = address_of(first, "web").rsplit(".", 1)[0] + ".1"  # the machine's end of the bridge
    # a listener that admits anyone: only the servers' own egress rules can keep them from it
    with socket.socket() as listener:
        listener.bind((gateway, 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        with socket.create_connection((gateway, port), timeout=3):
            pass  # it does accept connections
        for server in ("web1", "db1", "cache1"):
            assert not reaches(first, server, gateway, port), f"{server} opened a connection its role has no need of"


def test_only_the_load_balancer_reaches_a_web_server(pair):
    first, _ = pair
    web = address_of(first, "web")
    probe = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3",
             f"https://{web}/healthcheck.html"]
    assert subprocess.run(probe, capture_output=True, text=True).stdout == "200"  # root: as HAProxy is
    other = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *probe],
                           capture_output=True, text=True)
    assert other.stdout != "200"


def test_no_folder_of_an_environment_is_writable_by_everyone(pair):
    for env in pair:
        found = subprocess.run(["find", str(env.env_dir), "-xdev", "-type", "d", "-perm", "-o+w"],
                               capture_output=True, text=True)
        assert found.returncode == 0 and found.stdout == "", found.stdout
