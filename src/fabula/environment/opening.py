"""The user's actions (create, describe, destroy...), each a function of a Context."""
from __future__ import annotations

from pathlib import Path

from fabula.config import load_config
from fabula.context import Context
from fabula.output import Output
from fabula.providers.local import LocalProvider
from fabula.state import EnvPaths, EnvState, state_root


def open_environment(config_path: Path, env_name: str, out: Output) -> Context:
    config = load_config(config_path)
    env = config.environment(env_name)
    paths = EnvPaths(state_root(), config.project.project, env_name)
    state = EnvState.load(paths) or EnvState(project=paths.project, env=env_name, provider=env.provider)
    provider = LocalProvider(paths, env, state)  # the only provider so far; `aws` will be chosen here
    return Context(config=config, env_name=env_name, env=env, paths=paths, state=state, out=out,
                   provider=provider)
