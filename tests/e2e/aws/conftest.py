"""The aws provider's end-to-end tests run in a lab (tests/awslab.py): moto's server as AWS's
control plane, a network namespace with its own sshd per instance, real target health and an
HAProxy standing in for the ALB's data plane."""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabula.sample import SampleEnvironment, make_app_repo
from tests.awslab import AwsLab, aws_keys, aws_lab

ENV = "lab"


@pytest.fixture(scope="module")
def lab() -> Iterator[AwsLab]:
    with aws_lab() as made:
        yield made


@pytest.fixture(scope="module")
def environment(lab: AwsLab) -> Iterator[SampleEnvironment]:
    base = Path(tempfile.mkdtemp(prefix="fabula-aws-", dir="/var/tmp"))
    base.chmod(0o755)
    app = base / "app"
    make_app_repo(app, f"aws-{lab.tag}", ENV, aws_keys(lab), provider="aws")
    env = SampleEnvironment(app, base / "state", ENV, url=lab.url)   # the lab has no DNS for the ALB's name
    try:
        created = env.fabula("create", ENV, timeout=900)
        assert created.returncode == 0, f"create failed:\n{created.stdout}\n{created.stderr}"
        lab.log("first create:\n" + created.stderr)
        yield env
    finally:
        destroyed = env.fabula("destroy", ENV, "--yes", timeout=600)
        gone = env.fabula("describe", ENV, "--json")
        shutil.rmtree(base, ignore_errors=True)
        if destroyed.returncode != 0 or json.loads(gone.stdout or "{}").get("exists"):
            pytest.fail(f"destroy failed or left the environment: {destroyed.stderr[-2000:]}")
