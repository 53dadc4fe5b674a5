"""worker: the same release as the web servers, without nginx: Celery worker and beat (when the
app has a Celery app), PgBouncer to the databases. Migrations run here, once, before the web
servers take traffic."""
from __future__ import annotations

from fabula.context import Context
from fabula.providers.base import EgressRule, Host
from fabula.roles import appserver
from fabula.roles.base import Role
from fabula.supervisor import Program, Supervisor


class Worker(Role):
    name = "worker"
    packages = ("pgbouncer",)

    def egress(self, ctx: Context) -> list[EgressRule]:
        return appserver.app_egress(ctx)

    def services_for(self, ctx: Context) -> tuple[str, ...]:
        return ("pgbouncer", "celery", "celerybeat") if ctx.config.project.app.celery else ("pgbouncer",)

    def celery_programs(self, ctx: Context, host: Host) -> list[Program]:
        app = ctx.config.project.app.celery
        if not app:
            return []
        code = str(appserver.current(host) / "code")
        env = appserver.app_environment(ctx, host)
        beat_dir = host.path("data", "celerybeat")
        host.make_dirs([beat_dir], owner=host.accounts.app)
        base = [appserver.python(host), "-m", "celery", "-A", app]
        return [
            Program("celery", base + ["worker", "--loglevel", "INFO", "--concurrency",
                                      str(ctx.env.celery_concurrency), "--hostname", f"celery@{host.name}"],
                    user=host.accounts.app, directory=code, environment=env,
                    # long tasks (the seed: 5-10 minutes) finish before a stop completes
                    stopwaitsecs=ctx.env.celery_drain_timeout),
            Program("celerybeat", base + ["beat", "--loglevel", "INFO", "--schedule",
                                          str(beat_dir / "schedule"), "--pidfile="],
                    user=host.accounts.app, directory=code, environment=env),
        ]

    def converge(self, ctx: Context, host: Host) -> None:
        moved = self.migrate_here(ctx, host)
        self.start_celery(ctx, host, moved)

    def migrate_here(self, ctx: Context, host: Host) -> bool:
        """The release on the server, its PgBouncer, then the migrations; True if the release moved
        (Celery, still on the previous one, is restarted by start_celery)."""
        appserver.prepare_app_dirs(host)
        moved = appserver.install_release(ctx, host)
        bouncer, bouncer_changed = appserver.pgbouncer(ctx, host)
        supervisor = Supervisor(host)
        started = supervisor.apply([bouncer])
        appserver.reload_changed(host, started, {"pgbouncer": bouncer_changed is not None},
                                 how={"pgbouncer": "HUP"} if bouncer_changed == "HUP" else {})
        supervisor.wait_running(["pgbouncer"])
        migrate(ctx, host)
        return moved

    def start_celery(self, ctx: Context, host: Host, moved: bool) -> None:
        celery = self.celery_programs(ctx, host)
        if celery:
            supervisor = Supervisor(host)
            started = supervisor.apply(celery)
            appserver.reload_changed(host, started, {p.name: moved for p in celery}, how={})
            supervisor.wait_running([p.name for p in celery])
            ctx.out.step(host.name, "celery worker and beat running")


def migrate(ctx: Context, host: Host) -> None:
    release = ctx.require_release()
    if ctx.state.migrated_release == release.id:
        return
    ctx.out.step(host.name, "running migrations")
    appserver.run_manage(ctx, host, "migrate", "--noinput")
    ctx.out.step(host.name, "migrations applied")
    ctx.state.migrated_release = release.id
    ctx.state.save(ctx.paths)
