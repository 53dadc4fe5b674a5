"""The system users of one environment: each environment's services run as users of its own, so
that one environment's processes cannot read another's files, sockets or process environments
(/proc/PID/environ is readable by the same user only), even on one machine.

All of them have the environment's group as their primary group: the environment's directory is
open to that group only, so no user of another environment can even look inside it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accounts:
    tag: str   # EnvPaths.tag: a short id of (project, environment)

    def _name(self, what: str) -> str:
        # at most 32 characters and a valid user name whatever the project's and environment's names
        return f"fb-{self.tag}-{what}"

    @property
    def group(self) -> str:
        return f"fb-{self.tag}"

    @property
    def app(self) -> str:
        """gunicorn, Celery, the release build, migrations, `fabula manage`: the app's own code."""
        return self._name("app")

    @property
    def db(self) -> str:
        """PostgreSQL and PgBouncer."""
        return self._name("db")

    @property
    def web(self) -> str:
        """nginx's workers."""
        return self._name("web")

    @property
    def cache(self) -> str:
        """Redis and RabbitMQ."""
        return self._name("cache")

    def users(self) -> dict[str, str]:
        return {"app": self.app, "db": self.db, "web": self.web, "cache": self.cache}
