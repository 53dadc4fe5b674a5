"""Maintenance mode (FabulAWS's begin_upgrade / end_upgrade): every web server answers 503 with
the maintenance page, while the load balancer's health check keeps passing."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from fabula.context import Context
from fabula.errors import ConfigError
from fabula.providers.base import Host

DEFAULT_PAGE = Path(__file__).parent / "templates" / "maintenance.html"


def directory(host: Host) -> PurePosixPath:
    return host.path("etc", "maintenance")


def install_page(ctx: Context, host: Host) -> None:
    page = ctx.config.project.app.maintenance_page
    path = (ctx.config.path.parent / page) if page else DEFAULT_PAGE
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{ctx.config.path}: app.maintenance_page: cannot read {path}: {exc.strerror}",
                          "point it at an HTML file, or remove the key for the default page") from None
    host.make_dirs([directory(host)])
    host.put_file(directory(host) / "index.html", content)


def set_host(host: Host, on: bool) -> None:
    flag = directory(host) / "on"
    if on:
        host.put_file(flag, "on\n")
    else:
        host.run(["rm", "-f", str(flag)])


def set_maintenance(ctx: Context, on: bool) -> None:
    for record in ctx.state.by_role("web"):
        set_host(ctx.host(record.name), on)
    ctx.out.step("maintenance", "on: web servers answer 503 with the maintenance page" if on else "off")
