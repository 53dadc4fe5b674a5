"""Maintenance mode (FabulAWS's begin_upgrade / end_upgrade): every web server answers 503 with
the maintenance page, while the load balancer's health check keeps passing."""
from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

from fabula.config import read_open_file, shown_path
from fabula.context import Context
from fabula.errors import ConfigError
from fabula.providers.base import Host

DEFAULT_PAGE = Path(__file__).parent / "templates" / "maintenance.html"
MAX_PAGE_BYTES = 1 << 20


def directory(host: Host) -> PurePosixPath:
    return host.path("etc", "maintenance")


def install_page(ctx: Context, host: Host) -> None:
    content = page_content(ctx) if ctx.config.project.app.maintenance_page else DEFAULT_PAGE.read_bytes()
    host.make_dirs([directory(host)])
    host.put_file(directory(host) / "index.html", content)


def page_content(ctx: Context) -> bytes:
    """app.maintenance_page, read as root to be served to everyone: the file itself, no symbolic
    link (O_NOFOLLOW), and the file opened still inside the app's folder, as checked at load."""
    page = ctx.config.project.app.maintenance_page
    assert page is not None
    path, folder = ctx.config.path.parent / page, ctx.config.source_dir
    shown = f"{ctx.config.path}: app.maintenance_page: {shown_path(path)}"
    hint = "point app.maintenance_page at an HTML file of the app (not a link), or remove it for the default page"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}"
        raise ConfigError(f"{shown} {reason}", hint) from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))  # the file open, whatever its path said
        if not opened.is_relative_to(folder):
            raise ConfigError(f"{shown} is {shown_path(opened)}, outside the app's folder {shown_path(folder)}",
                              hint)
        return read_open_file(fd, MAX_PAGE_BYTES, "an HTML page", shown, hint)
    finally:
        os.close(fd)


def set_host(host: Host, on: bool) -> None:
    flag = directory(host) / "on"
    if on:
        host.put_file(flag, "on\n")
    else:
        host.run(["rm", "-f", str(flag)])


def set_maintenance(ctx: Context, on: bool, names: list[str] | None = None) -> None:
    """The maintenance page on or off on these web servers (default: every one of the group)."""
    for name in [r.name for r in ctx.state.by_role("web")] if names is None else names:
        set_host(ctx.host(name), on)
    ctx.out.step("maintenance", "on: web servers answer 503 with the maintenance page" if on else "off")
