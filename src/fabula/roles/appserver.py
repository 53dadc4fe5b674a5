"""What web and worker servers share: the app's release, its environment (the twelve-factor
settings), and PgBouncer pooling connections to the databases over TLS."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit

from fabula.context import Context, Release
from fabula.errors import FabulaError
from fabula.parallel import at_once
from fabula.providers.base import EgressRule, Host
from fabula.supervisor import Program, Supervisor
from fabula.templates import render

APP_PORT = 8000
PGBOUNCER_PORT = 6432


def current(host: Host) -> PurePosixPath:
    return host.path("current")


def python(host: Host) -> str:
    return str(current(host) / "venv" / "bin" / "python")


def put_release(host: Host, release: Release) -> PurePosixPath:
    """The built release on the server, under releases/<id> (copied once, never changed)."""
    target = host.path("releases", release.id)
    if host.stat(target) is None:
        partial = host.path("releases", f"{release.id}.partial")
        host.make_dirs([host.path("releases")])
        host.check(["rm", "-rf", str(partial)])  # an interrupted earlier copy
        host.copy_tree(Path(release.path), partial)
        host.check(["mv", "-T", str(partial), str(target)])
    return target


def install_release(ctx: Context, host: Host) -> bool:
    """Put the release on the server and point `current` at it; True if `current` moved."""
    release = ctx.require_release()
    put_release(host, release)
    target = f"releases/{release.id}"
    link = current(host)
    if host.run(["readlink", str(link)]).stdout.strip() == target:
        return False
    host.check(["ln", "-sfn", target, f"{link}.new"])
    host.check(["mv", "-T", f"{link}.new", str(link)])  # atomic switch
    return True


# a Unix socket's address holds at most 107 bytes of path (sun_path's 108, with its NUL)
SOCKET_PATH_MAX = 107


def fits_socket_address(path: PurePosixPath | str) -> bool:
    return len(str(path).encode()) <= SOCKET_PATH_MAX


def pgbouncer_run_dir(host: Host) -> PurePosixPath:
    return host.path("run", "pgbouncer")


def pgbouncer_socket_dir(host: Host) -> PurePosixPath | None:
    """The folder of PgBouncer's Unix socket, the app's way in (see `pgbouncer`); None when the
    socket's path would be too long for a socket address (a deep state directory, long names):
    the app then reaches PgBouncer on 127.0.0.1:6432 with the `app` role's password, as before."""
    folder = pgbouncer_run_dir(host)
    return folder if fits_socket_address(f"{folder}/.s.PGSQL.{PGBOUNCER_PORT}") else None


def app_environment(ctx: Context, host: Host) -> dict[str, str]:
    """What the app's processes on this server receive (README: "What the app receives")."""
    socket_dir = pgbouncer_socket_dir(host)
    return app_variables(ctx, server=host.name, role=host.role, address=host.address,
                         static_root=str(current(host) / "static"), release_id=ctx.require_release().id,
                         # a home of the server's own: tools that keep files in ~ (gunicorn's
                         # control socket) don't collide
                         home=str(host.path("data", "home")),
                         app_user=host.accounts.app, pgbouncer_dir=str(socket_dir) if socket_dir else None) | {
        # the server's own: what the app and its libraries leave in the temporary folder (billiard's
        # pymp-* of Celery's pool, killed before it removes them) goes with the server, not to the
        # machine's /tmp (Python's tempfile falls back to /tmp where the folder is missing)
        "TMPDIR": str(host.path("data", "tmp"))}


def app_variables(ctx: Context, *, server: str, role: str, address: str, static_root: str,
                  release_id: str, home: str, app_user: str, pgbouncer_dir: str | None) -> dict[str, str]:
    """Every variable the README promises the app, with the environment's real values, wherever
    its code is imported (the release build too: settings may read any of them).

    The databases are the server's PgBouncer: over its Unix socket in `pgbouncer_dir` (the URL's
    host, percent-encoded, as libpq and dj-database-url read it) as the app's OS user, with no
    password (peer authentication); without `pgbouncer_dir`, on 127.0.0.1 as `app` with its password."""
    s, db = ctx.secrets, ctx.database_name
    cache = ctx.state.one("cache")
    if cache is None or s is None:
        raise FabulaError(f"environment {ctx.env_name} has no servers yet: the app's settings get their "
                          "addresses and passwords from them", f"run `fabula create {ctx.env_name}` first")
    if pgbouncer_dir:
        local_db = f"postgres://{app_user}@{quote(pgbouncer_dir, safe='')}:{PGBOUNCER_PORT}"
    else:
        local_db = f"postgres://app:{s.db_app_password}@127.0.0.1:{PGBOUNCER_PORT}"
    lb_host = urlsplit(ctx.provider.load_balancer.url()).hostname or "localhost"
    allowed = [lb_host, "localhost", "127.0.0.1", address, *ctx.env.domains]
    return {
        "DATABASE_URL": f"{local_db}/{db}",
        # PgBouncer points this at a serving replica, or at the primary while there is none
        "DATABASE_REPLICA_URL": f"{local_db}/{db}_replica",
        "REDIS_URL": f"redis://:{s.redis_password}@{cache.address}:6379/0",
        "CELERY_BROKER_URL": f"amqp://fabula:{s.rabbitmq_password}@{cache.address}:5672//",
        "DJANGO_SECRET_KEY": s.django_secret_key,
        "DJANGO_ALLOWED_HOSTS": ",".join(dict.fromkeys(allowed)),
        "DJANGO_SETTINGS_MODULE": ctx.config.project.app.settings,
        "STATIC_ROOT": static_root,
        "FABULA_ENVIRONMENT": ctx.env_name,
        "FABULA_SERVER": server,
        "FABULA_ROLE": role,
        "FABULA_RELEASE": release_id,
        "PYTHONUNBUFFERED": "1",
        "HOME": home,
    }


def app_egress(ctx: Context) -> list[EgressRule]:
    """What web and worker servers reach: the cache's Redis and RabbitMQ, and the databases."""
    return [EgressRule(6379, "redis on the cache", to_roles=("cache",)),
            EgressRule(5672, "rabbitmq on the cache", to_roles=("cache",)),
            EgressRule(5432, "postgresql on the databases", to_roles=("db-primary", "db-replica"))]


def pgbouncer(ctx: Context, host: Host) -> tuple[Program, str | None]:
    """PgBouncer's files and program, and how a running PgBouncer takes a change of them: None
    (nothing changed), "HUP" (an online reload) or "restart".

    The app connects over the Unix socket with peer authentication: the kernel vouches for the
    connecting process's user, which must be the environment's app user, so a new connection per
    request costs no SCRAM exchange (PBKDF2 on both ends) and no password is in the app's
    environment. The socket's folder admits the environment's group only (search, no listing);
    peer then admits only the app user of that group. 127.0.0.1:6432 still takes the `app` role
    with its password (SCRAM), for the operator's tools. Either way PgBouncer logs in to PostgreSQL
    as `app`, over TLS, with the password from its auth_file."""
    conf_dir, run_dir = host.path("etc", "pgbouncer"), pgbouncer_run_dir(host)
    if pgbouncer_socket_dir(host) is None:
        ctx.out.warn(f"{host.name}: {run_dir}/.s.PGSQL.{PGBOUNCER_PORT} is longer than a Unix socket's "
                     f"{SOCKET_PATH_MAX} bytes: the app reaches PgBouncer on 127.0.0.1 with a password (a "
                     "new database connection costs a SCRAM exchange); a shorter state directory "
                     "(FABULA_STATE_DIR) or shorter names avoid it")
    db_user = host.accounts.db
    host.make_dirs([conf_dir], mode=0o700, owner=db_user)
    # its Unix socket: reachable by the environment's group (its primary group), for peer
    # authentication to admit only the app user of it
    host.make_dirs([run_dir], mode=0o710, owner=db_user)
    primary, replicas = ctx.state.require("db-primary"), ctx.state.serving_replicas()
    replica = replicas[0] if replicas else primary
    # PgBouncer 1.18 exits on the first login after a reload that gives an existing database a
    # `user=` (pgbouncer issue #41): from a configuration of before it (SCRAM for the app, no
    # forced user), a restart, not a reload
    previous = host.read(conf_dir / "pgbouncer.ini")
    how = "restart" if previous is not None and b"auth_type = hba" not in previous else "HUP"
    changed = host.put_file(conf_dir / "root.crt", ctx.require_ca().cert_pem, owner=db_user)
    # the app user's entry has no password: no password logs it in (peer, over the socket only)
    users = f'"app" "{ctx.require_secrets().db_app_password}"\n"{host.accounts.app}" ""\n'
    changed |= host.put_file(conf_dir / "userlist.txt", users, mode=0o600, owner=db_user)
    databases = f"{ctx.database_name},{ctx.database_name}_replica"
    changed |= host.put_file(conf_dir / "pg_hba.conf", render(
        __file__, "pgbouncer_hba.conf.j2", name=host.name, databases=databases, app_user=host.accounts.app),
        mode=0o600, owner=db_user)
    changed |= host.put_file(conf_dir / "pgbouncer.ini", render(
        __file__, "pgbouncer.ini.j2", name=host.name, database=ctx.database_name, primary=primary.address,
        replica=replica.address, conf_dir=conf_dir, run_dir=run_dir, app_user=host.accounts.app), owner=db_user)
    program = Program("pgbouncer", ["/usr/sbin/pgbouncer", str(conf_dir / "pgbouncer.ini")], user=db_user)
    return program, how if changed else None


def apply_pgbouncer_change(host: Host, how: str | None) -> None:
    """Have the running PgBouncer take its new configuration, as `pgbouncer` said."""
    if how == "HUP":
        Supervisor(host).signal("pgbouncer", "HUP")
    elif how == "restart":
        Supervisor(host).restart("pgbouncer")


def reload_changed(host: Host, started: set[str], changed: dict[str, bool], how: dict[str, str]) -> None:
    """Apply configuration changes to programs that were already running: by signal where the
    program reloads online (`how` maps name -> signal), else by restart."""
    supervisor = Supervisor(host)
    restarts = []
    for name, was_changed in changed.items():
        if was_changed and name not in started:
            if name in how:
                supervisor.signal(name, how[name])
            else:
                restarts.append(name)
    # at once: Celery's worker and beat each take a second or two to stop and as long to start
    at_once(restarts, supervisor.restart, name=lambda n: f"{host.name} {n}")


def prepare_app_dirs(host: Host) -> None:
    host.make_dirs([host.path("data", "home"), host.path("data", "tmp")], mode=0o700, owner=host.accounts.app)


def manage_argv(ctx: Context, host: Host, *args: str) -> list[str]:
    return [python(host), str(current(host) / "code" / ctx.config.project.app.manage), *args]


def run_manage(ctx: Context, host: Host, *args: str, timeout: float = 1800):
    return host.check(manage_argv(ctx, host, *args), user=host.accounts.app, env=app_environment(ctx, host),
                      timeout=timeout)
