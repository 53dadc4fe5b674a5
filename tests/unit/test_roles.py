"""Every role against fake hosts (fabula.testing): given an inventory, the files it writes (their
content, owner and mode), the programs it runs and as whom, and the commands it issues."""
from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from fabula.config import load_config
from fabula.context import Context, Release
from fabula.errors import FabulaError
from fabula.output import Output
from fabula.pki import CertificateAuthority
from fabula.providers.base import EgressRule, FileState, IngressRule, Result
from fabula.roles import ROLES, appserver, firewall_rules, web
from fabula.roles.postgres import PG_BIN
from fabula.secrets import Secrets
from fabula.state import EnvPaths, EnvState
from fabula.supervisor import Program, render_program
from fabula.testing import FakeProvider, ini_value, rpc_request
from fabula.topology import plan_servers

SECRETS = Secrets(django_secret_key="django-key-0123", db_app_password="app-pass-4567",
                  db_replication_password="repl-pass-89ab", redis_password="redis-pass-cdef",
                  rabbitmq_password="rabbit-pass-0246")


@pytest.fixture
def ctx(tmp_path) -> Context:
    app = tmp_path / "app"
    app.mkdir()
    (app / "requirements.txt").write_text("django\n")
    (app / "manage.py").write_text("")
    (app / "fabula.yml").write_text("""project: polls
app: {wsgi: polls.wsgi:application, settings: polls.settings, celery: polls.celery:app}
environments:
  testing: {servers: {web: 2, worker: 1, cache: 1, db-primary: 1, db-replica: 1}}
""")
    config = load_config(app / "fabula.yml")
    env = config.environment("testing")
    paths = EnvPaths(tmp_path / "state", "polls", "testing")
    state = EnvState(project="polls", env="testing", subnet="10.0.0.0/24")
    state.servers = plan_servers(env, state)
    provider = FakeProvider(state=state)
    for record in state.servers.values():
        provider.ensure_server(record.name, record.role)
    release = Release("abcdef012345", "abcdef0123456789", str(tmp_path / "releases" / "abcdef012345"))
    return Context(config=config, env_name="testing", env=env, paths=paths, state=state, out=Output(quiet=True),
                   provider=provider, secrets=SECRETS, ca=CertificateAuthority(paths), release=release)


def converge(ctx: Context, name: str):
    host = ctx.host(name)
    ROLES[host.role].converge(ctx, host)
    return host


def no_secret_in_argv(host) -> None:
    values = [getattr(SECRETS, n) for n in ("django_secret_key", "db_app_password", "db_replication_password",
                                            "redis_password", "rabbitmq_password")]
    for argv in host.commands:
        assert not any(v in arg for v in values for arg in argv), argv


def test_cache_runs_redis_and_rabbitmq_as_the_environments_cache_user_with_passwords_in_0600_files(ctx):
    host = converge(ctx, "cache1")
    redis_conf = host.path("etc", "redis", "redis.conf")
    assert f"requirepass {SECRETS.redis_password}" in host.text(redis_conf)
    assert f"bind {host.address} 127.0.0.1" in host.text(redis_conf)
    assert (host.files[redis_conf].mode, host.files[redis_conf].owner) == (0o600, host.accounts.cache)
    programs = host.programs()
    assert ini_value(programs["redis"], "user") == ini_value(programs["rabbitmq"], "user") == host.accounts.cache
    no_secret_in_argv(host)


def test_web_runs_nginx_workers_gunicorn_and_pgbouncer_as_users_of_the_environment(ctx):
    host = converge(ctx, "web1")
    nginx = host.text(host.path("etc", "nginx", "nginx.conf"))
    assert f"user {host.accounts.web} {host.accounts.group};" in nginx
    assert f"listen {host.address}:443 ssl;" in nginx
    programs = host.programs()
    assert ini_value(programs["gunicorn"], "user") == host.accounts.app
    assert ini_value(programs["pgbouncer"], "user") == host.accounts.db
    environment = ini_value(programs["gunicorn"], "environment")
    primary = ctx.state.one("db-primary")
    # the socket's folder, percent-encoded, each % doubled in supervisord's INI
    socket = str(host.path("run", "pgbouncer")).replace("/", "%%2F")
    assert f'DATABASE_URL="postgres://{host.accounts.app}@{socket}:6432/polls"' in environment
    assert SECRETS.db_app_password not in environment  # peer authentication: no password
    assert 'FABULA_SERVER="web1"' in environment and 'FABULA_ROLE="web"' in environment
    bouncer = host.text(host.path("etc", "pgbouncer", "pgbouncer.ini"))
    assert f"polls = host={primary.address} port=5432 dbname=polls user=app" in bouncer
    # its socket: the environment's group may reach it (search only), not everyone
    assert host.stat(host.path("run", "pgbouncer")).mode == 0o710
    # the program files hold secrets: root's only
    assert host.files[host.path("supervisor", "programs", "gunicorn.conf")].mode == 0o600
    # the release is copied once, and `current` points at it
    assert [str(target) for _, target in host.copied] == [str(host.path("releases", "abcdef012345.partial"))]
    assert host.ran("ln", "-sfn", "releases/abcdef012345")
    no_secret_in_argv(host)


def test_pgbouncer_admits_only_the_apps_os_user_on_its_socket_and_the_app_role_with_its_password_on_tcp(ctx):
    host = converge(ctx, "web1")
    conf = host.path("etc", "pgbouncer")
    bouncer = host.text(conf / "pgbouncer.ini")
    assert ini_value(bouncer, "auth_type") == "hba"
    assert ini_value(bouncer, "auth_hba_file") == str(conf / "pg_hba.conf")
    assert ini_value(bouncer, "unix_socket_dir") == str(host.path("run", "pgbouncer"))
    assert ini_value(bouncer, "listen_addr") == "127.0.0.1"
    rules = [line.split() for line in host.text(conf / "pg_hba.conf").splitlines()
             if line.strip() and not line.startswith("#")]
    # nothing else: no `trust`, no other user on the socket, no address but 127.0.0.1, no admin console
    assert rules == [["local", "polls,polls_replica", host.accounts.app, "peer"],
                     ["host", "polls,polls_replica", "app", "127.0.0.1/32", "scram-sha-256"]]
    # the app's OS user has no password (peer only); `app` has the one PgBouncer logs in with
    assert host.text(conf / "userlist.txt") == f'"app" "{SECRETS.db_app_password}"\n"{host.accounts.app}" ""\n'
    for name in ("userlist.txt", "pg_hba.conf"):
        assert (host.files[conf / name].mode, host.files[conf / name].owner) == (0o600, host.accounts.db)


def test_pgbouncer_is_restarted_not_reloaded_when_leaving_its_configuration_of_before_peer_auth(ctx):
    host = converge(ctx, "web1")
    ini = host.path("etc", "pgbouncer", "pgbouncer.ini")

    def pgbouncer_calls(before: str) -> list[str]:
        host.put_file(ini, before, owner=host.accounts.db)
        host.calls.clear()
        ROLES[host.role].converge(ctx, host)
        requests = [rpc_request(c) for c in host.calls]
        return [method for method, params in filter(None, requests) if params[:1] == ("pgbouncer",)]

    # PgBouncer 1.18 would exit on the next login after a reload adding `user=app` (its issue #41)
    old = "[databases]\npolls = host=10.0.0.1 port=5432 dbname=polls\n[pgbouncer]\nauth_type = scram-sha-256\n"
    assert pgbouncer_calls(old) == ["stopProcess", "startProcess"]
    # a change of today's configuration (a repointed database): an online reload
    assert pgbouncer_calls(host.text(ini).replace("host=", "host=10.9.9.9 x=")) == ["signalProcess"]
    assert pgbouncer_calls(host.text(ini)) == []


def test_a_socket_path_too_long_for_a_socket_address_falls_back_to_tcp_with_the_password(ctx, capsys):
    ctx.out = Output()
    host = ctx.host("web1")
    tail = "/run/pgbouncer/.s.PGSQL.6432"
    for length, fits in ((107, True), (108, False)):   # sun_path: 108 bytes with the NUL
        host.root = PurePosixPath("/" + "r" * (length - len(tail) - 1))
        assert (appserver.pgbouncer_socket_dir(host) is not None) is fits
    host.root = PurePosixPath("/var/tmp/fabula-bench-throughput-93uz48sz/state/bthru-543f/bench/servers/worker1")
    ROLES[host.role].converge(ctx, host)
    environment = ini_value(host.programs()["gunicorn"], "environment")
    assert f'DATABASE_URL="postgres://app:{SECRETS.db_app_password}@127.0.0.1:6432/polls"' in environment
    assert "longer than a Unix socket's 107 bytes" in capsys.readouterr().err


def test_nginx_reaches_gunicorn_on_a_unix_socket_in_a_folder_only_the_environments_users_may_enter(ctx):
    host = converge(ctx, "web1")
    socket = host.path("run", "gunicorn", "gunicorn.sock")
    command = ini_value(host.programs()["gunicorn"], "command").split()
    assert command[command.index("--bind") + 1] == f"unix:{socket}" and "127.0.0.1:8000" not in command
    assert f"server unix:{socket};" in host.text(host.path("etc", "nginx", "nginx.conf"))
    # gunicorn (the app user) makes the socket; the group (nginx's workers) may pass, others not
    assert host.dirs[socket.parent] == FileState(0o710, host.accounts.app)


def test_a_gunicorn_socket_path_too_long_falls_back_to_tcp_on_127_0_0_1(ctx, capsys):
    ctx.out = Output()
    host = ctx.host("web1")
    tail = "/run/gunicorn/gunicorn.sock"
    for length, fits in ((107, True), (108, False)):
        host.root = PurePosixPath("/" + "r" * (length - len(tail) - 1))
        assert (web.gunicorn_socket(host) is not None) is fits
    ROLES[host.role].converge(ctx, host)
    command = ini_value(host.programs()["gunicorn"], "command").split()
    assert command[command.index("--bind") + 1] == "127.0.0.1:8000"
    assert "server 127.0.0.1:8000;" in host.text(host.path("etc", "nginx", "nginx.conf"))
    assert "gunicorn.sock is longer than a Unix socket's 107 bytes" in capsys.readouterr().err


def test_worker_migrates_as_the_app_user_with_the_apps_variables_then_starts_celery(ctx):
    host = converge(ctx, "worker1")
    [migrate] = [c for c in host.calls if c.argv[-2:] == ["migrate", "--noinput"]]
    assert migrate.user == host.accounts.app != "root"
    assert migrate.env["DJANGO_SETTINGS_MODULE"] == "polls.settings"
    assert migrate.env["REDIS_URL"] == f"redis://:{SECRETS.redis_password}@{ctx.state.one('cache').address}:6379/0"
    assert ctx.state.migrated_release == "abcdef012345"
    programs = host.programs()
    assert {"celery", "celerybeat", "pgbouncer"} <= set(programs)
    assert ini_value(programs["celery"], "user") == host.accounts.app
    # once per release: a second converge runs no migration
    host.calls.clear()
    ROLES["worker"].converge(ctx, host)
    assert not [c for c in host.calls if "migrate" in c.argv]


def test_db_primary_initialises_as_the_db_user_and_sets_passwords_through_stdin(ctx):
    host = converge(ctx, "db1")
    [initdb] = host.ran(str(PG_BIN / "initdb"))
    assert initdb.user == host.accounts.db
    hba = host.text(host.path("etc", "postgresql", "pg_hba.conf"))
    assert "local    all          postgres                   peer map=fabula" in hba
    assert "hostssl  polls app" in " ".join(hba.split()).replace("hostssl polls app", "hostssl  polls app")
    ident = host.text(host.path("etc", "postgresql", "pg_ident.conf"))
    assert f"fabula     {host.accounts.db}    postgres" in ident
    setup = [c for c in host.ran(str(PG_BIN / "psql")) if c.input and "CREATE ROLE app" in c.input]
    assert setup and SECRETS.db_app_password in setup[0].input and setup[0].user == host.accounts.db
    assert host.stat(host.path("run", "postgresql")).mode == 0o700
    no_secret_in_argv(host)


def test_db_replica_takes_a_base_backup_from_the_primary_and_waits_for_streaming(ctx):
    host = ctx.host("db2")
    host.answer([str(PG_BIN / "psql")], Result(0, "streaming\n", ""))
    ROLES["db-replica"].converge(ctx, host)
    [backup] = host.ran(str(PG_BIN / "pg_basebackup"))
    assert backup.user == host.accounts.db
    assert f"host={ctx.state.one('db-primary').address}" in backup.argv[2] and "sslmode=verify-full" in backup.argv[2]
    pgpass = host.files[host.path("etc", "postgresql", "pgpass")]
    assert (pgpass.mode, pgpass.owner) == (0o600, host.accounts.db)
    no_secret_in_argv(host)


def test_security_groups_name_roles_and_the_load_balancer_not_addresses(ctx):
    web, cache, replica = (ctx.state.servers[n] for n in ("web1", "cache1", "db2"))
    assert firewall_rules(ctx, web) == [
        IngressRule(443, "https from the load balancer", from_load_balancer=True),
        EgressRule(6379, "redis on the cache", to_roles=("cache",)),
        EgressRule(5672, "rabbitmq on the cache", to_roles=("cache",)),
        EgressRule(5432, "postgresql on the databases", to_roles=("db-primary", "db-replica"))]
    assert {r.from_roles for r in firewall_rules(ctx, cache)} == {("web", "worker")}
    replica.rebuild = True  # a fenced former primary awaiting its rebuild: admits no one
    assert firewall_rules(ctx, replica) == [EgressRule(5432, "replication from the primary", to_roles=("db-primary",))]


def test_a_supervisor_program_escapes_its_environment_and_command():
    text = render_program(Program("app", ["python", "-c", "print('100%')"], user="u",
                                  environment={"A": 'quote " and % and , and \\'}), "/log")
    # supervisor interpolates %(...)s and splits on commas outside quotes: quoted, % doubled
    assert ini_value(text, "environment") == 'A="quote \\" and %% and , and \\\\",HOME="/tmp"'
    assert "%%" in ini_value(text, "command") and "\n[" not in text.split("[program:app]", 1)[1]


def test_the_strategy_is_serial_for_additive_migrations_and_full_otherwise():
    from fabula.deploy.rollout import choose

    additive = [{"migration": "notes.0002", "operations": [{"additive": True, "description": "AddField x"}]}]
    dropping = [{"migration": "notes.0003", "operations": [
        {"additive": False, "description": "RemoveField y", "why": "old code reads y"}]}]
    assert choose([], None) == ("serial", "no migrations")
    assert choose(additive, None)[0] == "serial"
    strategy, why = choose(dropping, None)
    assert strategy == "full" and "notes.0003" in why
    with pytest.raises(Exception, match="serial deploy would run the old code"):
        choose(dropping, "serial")


def test_lsn_values_order_wal_positions():
    from fabula.db.failover import lsn_value

    assert lsn_value("0/16B3748") == 0x16B3748
    assert lsn_value("1/0") == 1 << 32
    assert lsn_value("1/0") > lsn_value("0/FFFFFFFF")


def test_the_fake_host_keeps_paths_it_was_given():
    from fabula.testing import FakeHost

    host = FakeHost("web1", "web", "10.0.0.14")
    host.make_dirs([host.path("etc")], mode=0o700, owner="root")
    assert host.stat(PurePosixPath(host.root, "etc")).mode == 0o700
    assert host.put_file(host.path("etc", "a"), "x") and not host.put_file(host.path("etc", "a"), "x")


def test_the_autoscaler_runs_fabulas_own_code_only(ctx):
    """It runs as root: never a module of the app's folder (a `yaml.py` committed to the app)."""
    from fabula.autoscaling.controller import controller_program
    from fabula.providers.base import SYSTEM_PATH

    program = controller_program(ctx, ctx.provider.program_home(ctx.config.path, ctx.paths.root, "/usr/bin/python3"))
    isolated, module, name = program.command[1:4]
    assert (isolated, module, name) == ("-I", "-m", "fabula")
    assert program.directory == str(ctx.paths.env_dir) != str(ctx.config.path.parent)
    assert program.environment["PATH"] == SYSTEM_PATH


def test_logs_are_read_on_each_server_through_its_transport(ctx):
    from fabula.operations.logs import log_sources, show_logs

    web = ctx.host("web1")
    for service in ("nginx", "gunicorn"):
        web.write(web.path("log", f"{service}.log"), b"a line\n", mode=0o600, owner="root")
    [(host, paths)] = log_sources(ctx, "web1", None)
    assert host is web and [p.name for p in paths] == ["nginx.log", "gunicorn.log"]  # pgbouncer's: none yet
    assert show_logs([(host, paths)], lines=5, follow=False) == 0
    assert web.commands[-1] == ["tail", "-v", "-n", "5", *map(str, paths)]
    with pytest.raises(Exception, match="runs no service 'redis'"):
        log_sources(ctx, "web1", "redis")
    with pytest.raises(Exception, match="no server 'web9'"):
        log_sources(ctx, "web9", None)


def test_db_psql_runs_as_the_db_user_in_the_apps_database_on_the_primary_unless_told(ctx):
    from fabula.db.console import psql_session
    host, argv = psql_session(ctx, None, ["-c", "SELECT 1"])
    primary = ctx.state.one("db-primary").name
    assert host.name == primary
    assert argv[-2:] == ["-c", "SELECT 1"] and argv[argv.index("-d") + 1] == ctx.database_name
    assert argv[argv.index("-h") + 1] == str(host.path("run", "postgresql"))  # the socket, no TCP
    with pytest.raises(FabulaError, match="no database server 'web1'") as refused:
        psql_session(ctx, "web1", [])
    assert primary in (refused.value.hint or "")


def test_gunicorn_imports_the_app_once_and_forks_its_workers_unless_told_not_to(ctx):
    assert "--preload" in ini_value(converge(ctx, "web1").programs()["gunicorn"], "command")
    ctx.env = ctx.env.model_copy(update={"gunicorn_preload": False})
    assert "--preload" not in ini_value(converge(ctx, "web2").programs()["gunicorn"], "command")
