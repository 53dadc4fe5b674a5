"""cache: Redis (cache and sessions) and RabbitMQ (Celery's broker), both password-protected,
reachable only from web and worker servers."""
from __future__ import annotations

from fabula.context import Context
from fabula.providers.base import Host, IngressRule
from fabula.roles.base import Role, wait_port
from fabula.supervisor import Program, Supervisor
from fabula.templates import render

REDIS_PORT, AMQP_PORT = 6379, 5672


class Cache(Role):
    name = "cache"
    packages = ("redis-server", "rabbitmq-server")
    services = ("redis", "rabbitmq")

    def ingress(self, ctx: Context) -> list[IngressRule]:
        clients = ("web", "worker")
        return [IngressRule(REDIS_PORT, "redis from web and worker", from_roles=clients),
                IngressRule(AMQP_PORT, "rabbitmq from web and worker", from_roles=clients)]

    def converge(self, ctx: Context, host: Host) -> None:
        redis_changed = self._redis(ctx, host)
        rabbit_env, rabbit_changed = self._rabbitmq(ctx, host)
        supervisor = Supervisor(host)
        started = supervisor.apply([
            Program("redis", ["redis-server", str(host.path("etc", "redis", "redis.conf"))], user=host.accounts.cache),
            Program("rabbitmq", ["/usr/lib/rabbitmq/bin/rabbitmq-server"], user=host.accounts.cache,
                    environment=rabbit_env, stopwaitsecs=60, startsecs=3),
        ])
        for name, changed in (("redis", redis_changed), ("rabbitmq", rabbit_changed)):
            if changed and name not in started:
                supervisor.restart(name)
        wait_port(host, host.address, REDIS_PORT, what="Redis")
        ctx.out.step(host.name, "Redis accepting connections")
        wait_port(host, host.address, AMQP_PORT, timeout=120, what="RabbitMQ")
        ctx.out.step(host.name, "RabbitMQ accepting connections")

    def _redis(self, ctx: Context, host: Host) -> bool:
        conf_dir, data_dir = host.path("etc", "redis"), host.path("data", "redis")
        host.make_dirs([conf_dir, data_dir], mode=0o700, owner=host.accounts.cache)
        return host.put_file(conf_dir / "redis.conf", render(
            __file__, "redis.conf.j2", name=host.name, address=host.address,
            password=ctx.require_secrets().redis_password, data_dir=data_dir), mode=0o600, owner=host.accounts.cache)

    def _rabbitmq(self, ctx: Context, host: Host) -> tuple[dict[str, str], bool]:
        conf_dir, data_dir = host.path("etc", "rabbitmq"), host.path("data", "rabbitmq")
        log_dir = host.path("log", "rabbitmq")
        host.make_dirs([conf_dir, data_dir, log_dir], mode=0o700, owner=host.accounts.cache)
        changed = host.put_file(conf_dir / "rabbitmq.conf", render(
            __file__, "rabbitmq.conf.j2", name=host.name, address=host.address,
            password=ctx.require_secrets().rabbitmq_password), mode=0o600, owner=host.accounts.cache)
        changed |= host.put_file(conf_dir / "enabled_plugins", "[].\n", owner=host.accounts.cache)
        changed |= host.put_file(conf_dir / "rabbitmq-env.conf", "# written by fabula\n", owner=host.accounts.cache)
        environment = {
            # a node of its own, with its own files and Erlang cookie, inside this server's namespace
            "HOME": str(data_dir), "RABBITMQ_NODENAME": "rabbit@localhost",
            "RABBITMQ_CONFIG_FILE": str(conf_dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(conf_dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(conf_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(data_dir / "mnesia"), "RABBITMQ_LOG_BASE": str(log_dir),
            "RABBITMQ_PID_FILE": str(data_dir / "rabbitmq.pid"), "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Erlang's schedulers spin while they wait for work, by default: CPU taken from every
            # other server of the machine (RabbitMQ's own start among them)
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none",
        }
        return environment, changed
