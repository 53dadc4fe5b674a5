"""web: nginx on 443 (TLS with the environment's internal certificate) in front of gunicorn
running the app; static files from the release; PgBouncer to the databases."""
from __future__ import annotations

import re
import time
from pathlib import PurePosixPath

from fabula import maintenance
from fabula.context import Context
from fabula.errors import FabulaError
from fabula.providers.base import EgressRule, Host, IngressRule
from fabula.roles import appserver
from fabula.roles.base import Role, ensure_certificate, wait_port
from fabula.supervisor import Program, Supervisor
from fabula.templates import render

HTTPS_PORT = 443
BOOT_FAILURE = "Worker failed to boot"
EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit)\b.*")


class Web(Role):
    name = "web"
    packages = ("nginx-light", "pgbouncer")
    services = ("nginx", "gunicorn", "pgbouncer")

    def ingress(self, ctx: Context) -> list[IngressRule]:
        return [IngressRule(HTTPS_PORT, "https from the load balancer", from_load_balancer=True)]

    def egress(self, ctx: Context) -> list[EgressRule]:
        return appserver.app_egress(ctx)

    def gunicorn(self, ctx: Context, host: Host) -> Program:
        cur = appserver.current(host)
        return Program(
            "gunicorn",
            [appserver.python(host), "-m", "gunicorn", "--bind", gunicorn_bind(host),
             "--workers", str(ctx.env.gunicorn_workers), "--chdir", str(cur / "code"),
             # no access log of its own: nginx's, in front of it, has every request with its time
             "--pythonpath", str(cur / "fabula"), "--graceful-timeout", "30",
             # the app imported once, then forked into the workers: a server starts on less CPU
             # (all new web servers of a deploy start at once). Either way a moved release
             # restarts gunicorn (below): with --preload a HUP would not load the new code
             *(["--preload"] if ctx.env.gunicorn_preload else []),
             "fabula_wsgi:application"],
            user=host.accounts.app, directory=str(cur / "code"),
            environment={**appserver.app_environment(ctx, host),
                         "FABULA_WSGI_APP": ctx.config.project.app.wsgi},
            stopwaitsecs=35)

    def nginx(self, ctx: Context, host: Host) -> tuple[Program, bool]:
        conf_dir = host.path("etc", "nginx")
        host.make_dirs([conf_dir])
        host.make_dirs([host.path("tmp", "nginx")], mode=0o700, owner=host.accounts.web)
        changed = ensure_certificate(ctx, host, conf_dir / "server.crt", conf_dir / "server.key", owner="root")
        maintenance.install_page(ctx, host)
        text = render(__file__, "nginx.conf.j2", name=host.name, root=host.root, address=host.address,
                      user=host.accounts.web, group=host.accounts.group,
                      conf_dir=conf_dir, app_upstream=gunicorn_bind(host),
                      maintenance_dir=maintenance.directory(host))
        conf = conf_dir / "nginx.conf"
        changed |= host.put_file(conf, text)
        tested = host.run(["nginx", "-t", "-q", "-c", str(conf)])
        if not tested.ok:
            raise FabulaError(f"{host.name}: nginx rejects {conf}:\n{tested.stderr}")
        return Program("nginx", ["nginx", "-c", str(conf), "-g", "daemon off;"]), changed

    def converge(self, ctx: Context, host: Host) -> None:
        appserver.prepare_app_dirs(host)
        socket = gunicorn_socket(host)
        if socket is None:
            ctx.out.warn(f"{host.name}: {gunicorn_socket_path(host)} is longer than a Unix socket's "
                         f"{appserver.SOCKET_PATH_MAX} bytes: nginx reaches gunicorn on 127.0.0.1:{appserver.APP_PORT} "
                         "(each request's connection then passes the server's firewall); a shorter state "
                         "directory (FABULA_STATE_DIR) or shorter names avoid it")
        else:
            # gunicorn (the app user) makes its socket here; nginx's workers, of the environment's
            # group, may reach it, and no one else
            host.make_dirs([socket.parent], mode=0o710, owner=host.accounts.app)
        moved = appserver.install_release(ctx, host)
        bouncer, bouncer_changed = appserver.pgbouncer(ctx, host)
        nginx, nginx_changed = self.nginx(ctx, host)
        supervisor = Supervisor(host)
        started = supervisor.apply([bouncer, self.gunicorn(ctx, host), nginx])
        appserver.reload_changed(host, started, {"pgbouncer": bouncer_changed is not None, "nginx": nginx_changed,
                                                 "gunicorn": moved},
                                 how={"nginx": "HUP",
                                      **({"pgbouncer": "HUP"} if bouncer_changed == "HUP" else {})})
        supervisor.wait_running(["pgbouncer", "nginx"])
        wait_port(host, host.address, HTTPS_PORT, what="nginx")
        # gunicorn's start is watched by the health check, which fails at once, with the app's
        # error from gunicorn's log, if it dies (with --preload a broken app stops the master)
        wait_healthy_here(ctx, host)
        ctx.out.step(host.name, f"nginx and gunicorn serving release {ctx.require_release().id}")


def gunicorn_socket_path(host: Host) -> PurePosixPath:
    return host.path("run", "gunicorn", "gunicorn.sock")


def gunicorn_socket(host: Host) -> PurePosixPath | None:
    """Where gunicorn listens for nginx: a Unix socket, which spares each request's new connection
    the loopback's TCP and the firewall's connection tracking (about a fifth of the requests/s
    through the load balancer, measured by bench/throughput.py); None when the path is too long
    for a socket address: then 127.0.0.1:APP_PORT."""
    path = gunicorn_socket_path(host)
    return path if appserver.fits_socket_address(path) else None


def gunicorn_bind(host: Host) -> str:
    """gunicorn's --bind, and nginx's upstream server (its own notation is the same)."""
    socket = gunicorn_socket(host)
    return f"unix:{socket}" if socket else f"127.0.0.1:{appserver.APP_PORT}"


def wait_healthy_here(ctx: Context, host: Host, timeout: float = 45) -> None:
    """The load balancer's own check, made on the server: HTTPS GET /healthcheck.html through
    nginx to gunicorn. Fails fast, with gunicorn's last words, when gunicorn cannot serve."""
    probe = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
             f"https://{host.address}/healthcheck.html"]
    deadline = time.monotonic() + timeout
    supervisor = Supervisor(host)
    log_path = host.path("log", "gunicorn.log")
    seen = len(host.read_file(log_path) or b"")  # only what this start wrote counts
    while host.run(probe, timeout=10).stdout.strip() != "200":
        state = supervisor.status().get("gunicorn")
        log = (host.read_file(log_path) or b"")[seen:].decode(errors="replace")
        if time.monotonic() > deadline or state in ("FATAL", "BACKOFF", "EXITED") or BOOT_FAILURE in log:
            # the exceptions' own lines say what is wrong; a traceback's frames rarely do. gunicorn
            # started (and may have failed once) before this wait began: if what came since holds
            # no exception, the whole log's last ones are this start's
            errors = exception_lines(log) or exception_lines((host.read_file(log_path) or b"").decode(errors="replace"))
            raise FabulaError(f"{host.name}: release {ctx.require_release().id} does not serve /healthcheck.html "
                              f"(gunicorn {(state or 'missing').lower()}): "
                              + "; ".join(errors[-3:] or ["no error logged"]),
                              f"`fabula logs {ctx.env_name} {host.name} gunicorn`")
        time.sleep(0.3)


def exception_lines(log: str) -> list[str]:
    return list(dict.fromkeys(line for line in log.splitlines() if EXCEPTION_LINE.match(line)))
