"""What web and worker servers share: the app's release, its environment (the twelve-factor
settings), and PgBouncer pooling connections to the databases over TLS."""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fabula.context import Context, Release
from fabula.errors import FabulaError
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


def app_environment(ctx: Context, host: Host) -> dict[str, str]:
    """What the app's processes on this server receive (README: "What the app receives")."""
    return app_variables(ctx, server=host.name, role=host.role, address=host.address,
                         static_root=str(current(host) / "static"), release_id=ctx.require_release().id,
                         # a home of the server's own: tools that keep files in ~ (gunicorn's
                         # control socket) don't collide
                         home=str(host.path("data", "home")))


def app_variables(ctx: Context, *, server: str, role: str, address: str, static_root: str,
                  release_id: str, home: str) -> dict[str, str]:
    """Every variable the README promises the app, with the environment's real values, wherever
    its code is imported (the release build too: settings may read any of them)."""
    s, db = ctx.secrets, ctx.database_name
    cache = ctx.state.one("cache")
    if cache is None or s is None:
        raise FabulaError(f"environment {ctx.env_name} has no servers yet: the app's settings get their "
                          "addresses and passwords from them", f"run `fabula create {ctx.env_name}` first")
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


def pgbouncer(ctx: Context, host: Host) -> tuple[Program, bool]:
    """PgBouncer's files and program; True if its configuration changed."""
    conf_dir, run_dir = host.path("etc", "pgbouncer"), host.path("run", "pgbouncer")
    db_user = host.accounts.db
    host.make_dirs([conf_dir], mode=0o700, owner=db_user)
    host.make_dirs([run_dir], mode=0o700, owner=db_user)  # its Unix socket: for no other user
    primary, replicas = ctx.state.require("db-primary"), ctx.state.serving_replicas()
    replica = replicas[0] if replicas else primary
    changed = host.put_file(conf_dir / "root.crt", ctx.require_ca().cert_pem, owner=db_user)
    changed |= host.put_file(conf_dir / "userlist.txt", f'"app" "{ctx.require_secrets().db_app_password}"\n',
                             mode=0o600, owner=db_user)
    changed |= host.put_file(conf_dir / "pgbouncer.ini", render(
        __file__, "pgbouncer.ini.j2", name=host.name, database=ctx.database_name, primary=primary.address,
        replica=replica.address, conf_dir=conf_dir, run_dir=run_dir), owner=db_user)
    return Program("pgbouncer", ["/usr/sbin/pgbouncer", str(conf_dir / "pgbouncer.ini")], user=db_user), changed


def reload_changed(host: Host, started: set[str], changed: dict[str, bool], how: dict[str, str]) -> None:
    """Apply configuration changes to programs that were already running: by signal where the
    program reloads online (`how` maps name -> signal), else by restart."""
    supervisor = Supervisor(host)
    for name, was_changed in changed.items():
        if was_changed and name not in started:
            if name in how:
                supervisor.signal(name, how[name])
            else:
                supervisor.restart(name)


def prepare_app_dirs(host: Host) -> None:
    host.make_dirs([host.path("data", "home")], mode=0o700, owner=host.accounts.app)


def manage_argv(ctx: Context, host: Host, *args: str) -> list[str]:
    return [python(host), str(current(host) / "code" / ctx.config.project.app.manage), *args]


def run_manage(ctx: Context, host: Host, *args: str, timeout: float = 1800):
    return host.check(manage_argv(ctx, host, *args), user=host.accounts.app, env=app_environment(ctx, host),
                      timeout=timeout)
