"""The aws provider's end-to-end tests run in a lab (tests/awslab.py): moto's server as AWS's
control plane, a network namespace with its own sshd per instance, real target health and an
HAProxy standing in for the ALB's data plane."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from fabula.sample import SampleEnvironment
from tests.awslab import AwsLab, aws_keys, aws_lab
from tests.helpers import created_environment

ENV = "lab"


@pytest.fixture(scope="module")
def lab() -> Iterator[AwsLab]:
    with aws_lab() as made:
        yield made


@pytest.fixture(scope="module")
def environment(lab: AwsLab) -> Iterator[SampleEnvironment]:
    # the lab has no DNS for the ALB's name: its URL leads to the lab's stand-in
    with created_environment(f"aws-{lab.tag}", ENV, aws_keys(lab), "aws", url=lab.url) as (env, created):
        lab.log("first create:\n" + created.stderr)
        yield env
