"""Launch configurations: the immutable releases built for an environment (one per git
revision, under ``releases/<id>``), which one its web group uses and which servers run which.

A release is never rebuilt or changed once built, so that every server given it runs the same
code, virtualenv and static files, and a rollback is a switch back to a release already there.
"""
from __future__ import annotations

import json
import subprocess
from datetime import datetime

from fabula import release
from fabula.context import Context, Release
from fabula.environment.audit import operation
from fabula.errors import ExitStatus, FabulaError


class BadRevision(FabulaError):
    exit_status = ExitStatus.BAD_INPUT  # bad input: nothing was built or recorded


def resolve_revision(ctx: Context, rev: str) -> str:
    """The commit `rev` names in app.source, or a BadRevision saying which revisions exist."""
    source = ctx.config.source_dir
    try:
        return release.resolve(ctx, rev)[0]
    except FabulaError:
        in_a_repository = subprocess.run(["git", "-C", str(source), "rev-parse", "--git-dir"],
                                         capture_output=True).returncode == 0
        if not in_a_repository:
            raise  # release.resolve's own error says how to make app.source a repository
        raise BadRevision(f"revision {rev!r} is not a commit of {source}",
                          f"give a branch, tag or commit of that repository "
                          f"(`git -C {source} log --oneline` lists them)") from None


def built_releases(ctx: Context) -> list[dict]:
    """The metadata of every complete release, oldest first (a build in progress has none yet)."""
    found = []
    if ctx.paths.releases_dir.is_dir():
        for meta in ctx.paths.releases_dir.glob(f"*/{release.METADATA}"):
            if meta.parent.name.startswith("."):
                continue  # a build's working folder
            try:
                found.append(json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue  # unreadable metadata: not a release fabula can deploy
    return sorted(found, key=lambda r: r.get("built_at") or 0)


def build_release(ctx: Context, rev: str = "HEAD") -> tuple[Release, bool]:
    """Build the release of `rev` (or reuse it, if built before); (the release, whether reused)."""
    commit = resolve_revision(ctx, rev)  # before the lock: a bad revision leaves nothing behind
    with operation(ctx, "release build") as op:
        reused = any(r.get("commit") == commit for r in built_releases(ctx))
        op.details.update(rev=rev, reused=reused)
        with op.phase("code+virtualenv+static"):
            built = release.build(ctx, commit)
        op.details["release"] = built.id
    return built, reused


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds") if timestamp else None


def releases_report(ctx: Context) -> dict:
    """Every release: built when and how fast, whether the group uses it, which servers run it."""
    running: dict[str, list[str]] = {}
    for server in ctx.state.servers.values():
        if server.release:
            running.setdefault(server.release, []).append(server.name)
    rows = [{"id": r["id"], "commit": r.get("commit"), "built_at": _iso(r.get("built_at")),
             "build_seconds": r.get("build_seconds"), "built_on": r.get("built_on", "this machine"), "built": True}
            for r in built_releases(ctx)]
    # a release in use but no longer on disk is shown too: its servers still run it
    in_use = {rid for rid in (ctx.state.release, *running) if rid is not None} - {r["id"] for r in rows}
    rows += [{"id": rid, "commit": None, "built_at": None, "build_seconds": None, "built_on": None, "built": False}
             for rid in sorted(in_use)]
    for row in rows:
        row["group"] = row["id"] == ctx.state.release
        row["servers"] = sorted(running.get(row["id"], []))
    return {"project": ctx.project, "environment": ctx.env_name, "group_release": ctx.state.release,
            "releases": rows}
