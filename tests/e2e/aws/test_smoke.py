"""An opt-in smoke test against real AWS, for users who have an account: it creates a small
environment of the sample app (one instance per role, one web server), fetches its page through
the real ALB, destroys it, and checks that nothing tagged is left. It costs money (a few cents:
about ten minutes of the instances and the load balancer) and is skipped unless asked for:

    FABULA_AWS_SMOKE=1                       # the switch
    AWS_PROFILE / AWS_ACCESS_KEY_ID ...      # credentials allowing README's IAM policy
    AWS_DEFAULT_REGION=eu-west-1             # where to make it
    FABULA_AWS_SMOKE_BUCKET=my-fabula-smoke  # an S3 bucket name for the state (made if missing)
    FABULA_AWS_SMOKE_ADMIN=203.0.113.7/32    # this machine's public address: SSH is admitted from it

It runs from a Debian 12 machine of the instances' architecture (releases are built here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from fabula.sample import SampleEnvironment, make_app_repo

NEEDED = ("FABULA_AWS_SMOKE_BUCKET", "FABULA_AWS_SMOKE_ADMIN", "AWS_DEFAULT_REGION")

pytestmark = pytest.mark.skipif(
    os.environ.get("FABULA_AWS_SMOKE") != "1" or any(not os.environ.get(n) for n in NEEDED)
    or os.environ.get("AWS_ENDPOINT_URL") is not None,
    reason="the real-AWS smoke test runs only with FABULA_AWS_SMOKE=1 and " + ", ".join(NEEDED) + " set")


def tagged(tag: str) -> list[str]:
    import boto3

    found = boto3.client("resourcegroupstaggingapi").get_resources(
        TagFilters=[{"Key": "fabula:env", "Values": [tag]}])["ResourceTagMappingList"]
    # a terminated instance keeps its tags for up to an hour: only running ones count
    return [r["ResourceARN"] for r in found if ":instance/" not in r["ResourceARN"]]


def test_create_serve_and_destroy_on_aws():
    base = Path(tempfile.mkdtemp(prefix="fabula-smoke-"))
    key = base / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    project = f"smoke{os.urandom(3).hex()}"
    keys = "\n".join([
        f"    aws: {{region: {os.environ['AWS_DEFAULT_REGION']}, vpc: {{cidr: 10.40.0.0/16}}, "
        f"state_bucket: {os.environ['FABULA_AWS_SMOKE_BUCKET']}}}",
        f"    ssh: {{user: admin, key: {key}, known_hosts: {base / 'known_hosts'}}}",
        f"    admin_sources: [{os.environ['FABULA_AWS_SMOKE_ADMIN']}]",
        ""])
    make_app_repo(base / "app", project, "smoke", keys, provider="aws",
                  servers="{web: 1, worker: 1, cache: 1, db-primary: 1, db-replica: 1}")
    env = SampleEnvironment(base / "app", base / "state", "smoke")
    try:
        created = env.fabula("create", "smoke", timeout=3600)
        assert created.returncode == 0, created.stderr[-4000:]
        deadline = time.monotonic() + 300   # the ALB's DNS name takes a while to resolve
        while True:
            try:
                page = httpx.get(env.url + "/", verify=False, timeout=10)
                if page.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the page never came through the load balancer"
            time.sleep(5)
        assert "Polls on fabula" in page.text
    finally:
        destroyed = env.fabula("destroy", "smoke", "--yes", timeout=3600)
        gone = env.fabula("describe", "smoke", "--json")
        shutil.rmtree(base, ignore_errors=True)
    assert destroyed.returncode == 0, destroyed.stderr[-4000:]
    assert not json.loads(gone.stdout or "{}").get("exists")
    assert tagged(f"{project}-smoke") == []
