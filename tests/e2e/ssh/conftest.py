"""The ssh transport's tests run against a lab of hosts (tests/sshlab.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sshlab import HOSTS, Lab, sh, ssh_lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with ssh_lab(HOSTS) as made:
        yield made


@pytest.fixture(scope="module")
def user(lab: Lab) -> Iterator[str]:
    """A throw-away system user (the machine's, so every namespace's), its home in the lab."""
    name = f"fbssh-u{lab.tag}"
    sh("useradd", "--system", "--create-home", "--home-dir", str(lab.tmp / name), "--shell", "/usr/sbin/nologin",
       name)
    try:
        yield name
    finally:
        sh("pkill", "-9", "-u", name, check=False)
        sh("userdel", name, check=False)
        sh("groupdel", name, check=False)
