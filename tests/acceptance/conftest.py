"""The provider-neutral acceptance suite: what a user observes of an environment, driven only
through the `fabula` CLI, its JSON output and `fabula exec`, never through a provider's internals
(namespaces, paths on this machine). Every provider runs it: the `provider` parameter names it,
and `provider_section` writes that provider's part of fabula.yml. Checks that need one
provider's internals live in that provider's own tests (tests/e2e/local for local)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from fabula.sample import ALL_ROLES, free_ports, local_keys
from fabula.sample import SampleEnvironment as Environment
from tests.awslab import aws_keys, aws_lab
from tests.helpers import created_environment
from tests.sshlab import ROLES, ssh_keys, ssh_lab

ENV = "acc"
PROVIDERS = [p for p in os.environ.get("FABULA_ACCEPTANCE_PROVIDERS", "local,ssh,aws").split(",") if p]


@contextmanager
def provider_section(provider: str, https_port: int, http_port: int) -> Iterator[tuple[str, str | None, str | None]]:
    """The environment's provider-specific keys, as fabula.yml lines (indented for an environment),
    its `servers:` (None: the provider's servers are its `hosts:`) and where its load balancer's
    name leads (None: `describe`'s url), with what the provider's servers need meanwhile (ssh: a
    lab of hosts, each a network namespace running sshd; aws: moto's server and a namespace per
    instance, tests/awslab.py)."""
    if provider == "local":
        yield local_keys(https_port, http_port), ALL_ROLES, None
    elif provider == "ssh":
        with ssh_lab(len(ROLES)) as lab:
            yield ssh_keys(lab, https_port, http_port), None, None
    elif provider == "aws":
        with aws_lab() as cloud:
            yield aws_keys(cloud), ALL_ROLES, cloud.url
    else:
        raise ValueError(f"no acceptance set-up for provider {provider!r}")


@contextmanager
def acceptance_environment(provider: str, extra: str = "") -> Iterator[Environment]:
    if os.geteuid() != 0:
        pytest.skip("acceptance tests need root")
    with ExitStack() as stack:
        keys, servers, url = stack.enter_context(provider_section(provider, *free_ports(2)))
        yield stack.enter_context(_environment(provider, keys + extra, servers, url))


@contextmanager
def _environment(provider: str, keys: str, servers: str | None, url: str | None) -> Iterator[Environment]:
    with created_environment(f"acc-{os.urandom(3).hex()}", ENV, keys, provider, servers, url) as (env, _):
        yield env


@pytest.fixture(scope="package", params=PROVIDERS)
def environment(request) -> Iterator[Environment]:
    """One environment per provider for the whole suite (creating one is the slow part): the
    modules run in name order, architecture, then db (promote, restore), then deploy."""
    with acceptance_environment(request.param, extra="    db: {synchronous: true}\n") as env:
        yield env
