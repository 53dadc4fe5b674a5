"""The environment's secrets in SSM Parameter Store: SecureString parameters under
`/fabula/<project>/<env>/`, written only when missing or different.

Values are never logged, printed nor put in an error message: the call counter records call
names only, and an error of PutParameter is shown without AWS's text (cloud.QUIET_OPERATIONS).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from fabula.providers.aws.cloud import AwsError, Cloud, aws_errors

NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}", re.ASCII)
DELETE_BATCH = 10   # DeleteParameters takes at most 10 names


def prefix(cloud: Cloud) -> str:
    return f"/fabula/{cloud.project}/{cloud.env}/"


def _names(cloud: Cloud, *, decrypt: bool) -> dict[str, str]:
    found = {}
    for page in cloud.ssm.get_paginator("get_parameters_by_path").paginate(
            Path=prefix(cloud), Recursive=True, WithDecryption=decrypt):
        for parameter in page["Parameters"]:
            found[parameter["Name"].removeprefix(prefix(cloud))] = parameter.get("Value", "")
    return found


@aws_errors
def read_secrets(cloud: Cloud) -> dict[str, str]:
    """Every secret of the environment, decrypted: name (without the prefix) -> value."""
    return _names(cloud, decrypt=True)


@aws_errors
def names(cloud: Cloud) -> list[str]:
    """The secrets' names, without reading (decrypting) a value."""
    return sorted(_names(cloud, decrypt=False))


@aws_errors
def put_secrets(cloud: Cloud, secrets: Mapping[str, str]) -> list[str]:
    """Store each secret (name -> value) as a SecureString; return the names written (those
    missing or different). A secret stored but not given is kept: secrets are made once."""
    for name in secrets:
        if not NAME.fullmatch(name):
            raise AwsError(f"secret name {name[:40]!r} is not a parameter name", "use letters, digits, '_', '.', '-'")
    have = _names(cloud, decrypt=True)
    written = []
    for name, value in sorted(secrets.items()):
        if have.get(name) == value:
            continue
        if name in have:
            # (SSM refuses tags together with Overwrite: the parameter keeps those it was made with)
            cloud.ssm.put_parameter(Name=prefix(cloud) + name, Value=value, Type="SecureString", Overwrite=True)
        else:
            cloud.ssm.put_parameter(Name=prefix(cloud) + name, Value=value, Type="SecureString",
                                    Tags=cloud.tags())
        written.append(name)
    return written


@aws_errors
def delete_secrets(cloud: Cloud) -> list[str]:
    names = sorted(_names(cloud, decrypt=False))
    for start in range(0, len(names), DELETE_BATCH):
        cloud.ssm.delete_parameters(Names=[prefix(cloud) + n for n in names[start:start + DELETE_BATCH]])
    return names
