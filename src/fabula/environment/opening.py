"""Opening an environment: its configuration, its inventory, and the provider `provider:` names,
made from the registry (the one place that knows the providers' own packages)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fabula.config import EnvironmentConfig, load_config
from fabula.context import Context
from fabula.environment import sharing
from fabula.errors import ConfigError
from fabula.output import Output
from fabula.program_home import CONTROLLER_HOME
from fabula.providers.base import IngressRule, Provider
from fabula.providers.local import LocalProvider
from fabula.roles import ROLES
from fabula.state import EnvPaths, EnvState, state_root

ProviderFactory = Callable[[EnvPaths, EnvironmentConfig, EnvState, int], Provider]


def role_ingress() -> dict[str, list[IngressRule]]:
    """Each role's ingress rules, from which the aws provider makes its security groups before
    any context exists (a context holds the provider): a role's rules are its own, and none of
    them reads the context it is given."""
    return {name: role.ingress(None) for name, role in ROLES.items()}  # type: ignore[arg-type]


# The remote providers are imported when an environment needs one: boto3 and asyncssh are half a
# second of the start of every command, `describe` of a local environment included.
def _ssh(paths: EnvPaths, env: EnvironmentConfig, state: EnvState, euid: int) -> Provider:
    from fabula.providers.ssh import SshProvider
    return SshProvider(paths, env, state, euid=euid, controller_home=_controller_home())


def _aws(paths: EnvPaths, env: EnvironmentConfig, state: EnvState, euid: int) -> Provider:
    from fabula.providers.aws import AwsProvider
    return AwsProvider(paths, env, state, euid, role_rules=role_ingress(), controller_home=_controller_home())


def _controller_home() -> Path | None:
    """Where fabula was shipped, when this is its program on the platform host (set by the
    program's environment: Provider.program_home); None for a command run by an operator."""
    within = os.environ.get(CONTROLLER_HOME)
    return Path(within) if within else None


# provider: -> how to make it (fabula.yml's section of the same name configures it)
PROVIDERS: dict[str, ProviderFactory] = {
    "local": lambda paths, env, state, euid: LocalProvider(paths, env, state, euid=euid),
    "ssh": _ssh,
    "aws": _aws,
}


def open_environment(config_path: Path, env_name: str, out: Output, *, root: Path | None = None,
                     euid: int | None = None, shared: bool = True, check_paths: bool = True) -> Context:
    config = load_config(config_path, check_paths=check_paths)
    env = config.environment(env_name)
    paths = EnvPaths(root or state_root(), config.project.project, env_name)
    state = EnvState.load(paths) or EnvState(project=paths.project, env=env_name, provider=env.provider)
    factory = PROVIDERS.get(env.provider)
    if factory is None:  # the schema names the providers: only a registry out of step with it
        raise ConfigError(f"{config_path}: environments.{env_name}.provider: no provider `{env.provider}`",
                          f"use one of {', '.join(sorted(PROVIDERS))}")
    provider = factory(paths, env, state, os.geteuid() if euid is None else euid)
    ctx = Context(config=config, env_name=env_name, env=env, paths=paths, state=state, out=out, provider=provider)
    if shared:
        sharing.refresh(ctx)  # a team's environment: the state as its hosts have it
    return ctx
