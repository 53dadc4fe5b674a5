"""The context every AWS step takes: a boto3 session for the environment's region, the tags that
mark the environment's resources, a count of the API calls made, and AWS's errors as fabula's.

Every resource fabula makes carries `fabula:env=<project>-<env>` (the name the issue gives) and
`fabula:project=<project>`: the first alone is ambiguous when names hold '-' (project `a-b`, env
`c` and project `a`, env `b-c`), so lookups match both. Resources are found again by these tags,
never by a ClientToken (moto does not make it idempotent) nor by what a state file says.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fabula.config.values import cut
from fabula.errors import FabulaError

TAG = "fabula:env"
PROJECT_TAG = "fabula:project"
# calls that change nothing: the rest count as changes (a second ensure must make none)
READ_PREFIXES = ("Describe", "List", "Get", "Head")
# ALB and target group names: at most 32 characters, letters, digits and '-'
ELB_NAME_MAX = 32
# operations whose error text is not shown: it could quote the value (a secret) that was sent
QUIET_OPERATIONS = frozenset({"PutParameter"})


class AwsError(FabulaError):
    """An AWS call failed: names the call, AWS's code and the fix."""


@dataclass
class CallCounter:
    """Counts every API call, through botocore's `before-call` event (so calls made by waiters and
    paginators count too). Never records the calls' parameters: they may hold secrets."""

    calls: Counter[str] = field(default_factory=Counter)   # "ec2.CreateVpc" -> how many times
    last: str = ""

    def record(self, model: Any, **_: Any) -> None:
        self.last = f"{model.service_model.service_name}.{model.name}"
        self.calls[self.last] += 1

    def total(self) -> int:
        return sum(self.calls.values())

    def changes(self) -> dict[str, int]:
        """The calls that may change something (create, put, modify, delete...)."""
        return {name: n for name, n in self.calls.items() if not name.split(".", 1)[1].startswith(READ_PREFIXES)}

    def reset(self) -> None:
        self.calls.clear()
        self.last = ""


@dataclass
class Cloud:
    """One environment's view of one AWS region. Clients are made once per service and kept here
    (never in a module-level cache), so two Clouds never share a session or a counter."""

    project: str
    env: str
    region: str
    session: Any
    counter: CallCounter
    sleep: Callable[[float], None] = time.sleep
    wait_timeout: float = 900   # seconds a deletion may wait for AWS to let go of a dependency
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, project: str, env: str, region: str, *, session: Any = None,
             sleep: Callable[[float], None] = time.sleep) -> Cloud:
        session = session or boto3.Session(region_name=region)
        quiet_sdk_logs()
        counter = CallCounter()
        # clients copy the session's event hooks when they are made: register before any is
        session.events.register("before-call", counter.record)
        return cls(project=project, env=env, region=region, session=session, counter=counter, sleep=sleep)

    # -- clients -------------------------------------------------------------------------------
    def _client(self, service: str) -> Any:
        if service not in self._clients:
            # standard retries back off on throttling, which a create of ~40 calls can meet
            self._clients[service] = self.session.client(
                service, region_name=self.region, config=Config(retries={"mode": "standard", "max_attempts": 8}))
        return self._clients[service]

    @property
    def ec2(self) -> Any:
        return self._client("ec2")

    @property
    def elbv2(self) -> Any:
        return self._client("elbv2")

    @property
    def autoscaling(self) -> Any:
        return self._client("autoscaling")

    @property
    def acm(self) -> Any:
        return self._client("acm")

    @property
    def ssm(self) -> Any:
        return self._client("ssm")

    @property
    def s3(self) -> Any:
        return self._client("s3")

    @property
    def iam(self) -> Any:
        return self._client("iam")

    @property
    def sts(self) -> Any:
        return self._client("sts")

    # -- names and tags --------------------------------------------------------------------------
    @property
    def tag_value(self) -> str:
        return f"{self.project}-{self.env}"

    def name(self, suffix: str = "") -> str:
        """`<project>-<env>[-suffix]`: the seed's names (myproject-web-sg...)."""
        return f"{self.tag_value}-{suffix}" if suffix else self.tag_value

    def short_name(self, suffix: str) -> str:
        """A name for a load balancer or target group (at most 32 characters): `<project>-<env>-
        <suffix>` when it fits, else cut with a hash of the whole so that two environments
        never share one."""
        full = self.name(suffix)
        if len(full) <= ELB_NAME_MAX:
            return full
        digest = hashlib.sha256(full.encode()).hexdigest()[:6]
        head = self.tag_value[:ELB_NAME_MAX - len(suffix) - len(digest) - 2].rstrip("-")
        return f"{head}-{digest}-{suffix}"

    def tags(self, name: str | None = None, **extra: str) -> list[dict[str, str]]:
        tags = {TAG: self.tag_value, PROJECT_TAG: self.project, **({"Name": name} if name else {}), **extra}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    def tag_spec(self, resource_type: str, name: str | None = None, **extra: str) -> list[dict[str, Any]]:
        return [{"ResourceType": resource_type, "Tags": self.tags(name, **extra)}]

    def filters(self, **extra: str) -> list[dict[str, Any]]:
        """EC2 filters that match this environment's resources (and `extra` tags)."""
        wanted = {TAG: self.tag_value, PROJECT_TAG: self.project, **extra}
        return [{"Name": f"tag:{key}", "Values": [value]} for key, value in wanted.items()]

    def owns(self, tags: Iterable[dict[str, str]] | None) -> bool:
        """Whether a resource's tags (AWS's [{Key, Value}]) are this environment's."""
        have = {t.get("Key"): t.get("Value") for t in tags or ()}
        return have.get(TAG) == self.tag_value and have.get(PROJECT_TAG) == self.project

    # -- waiting ---------------------------------------------------------------------------------
    def until_released(self, what: str, codes: tuple[str, ...], call: Callable[..., Any], /, **kwargs: Any) -> Any:
        """Call `call(**kwargs)` until AWS stops answering one of `codes` (a dependency not let go yet:
        a deleted load balancer's network interfaces hold its security group for minutes)."""
        deadline = time.monotonic() + self.wait_timeout
        delay = 2.0
        while True:
            try:
                return call(**kwargs)
            except ClientError as exc:
                if error_code(exc) not in codes:
                    raise
                if time.monotonic() > deadline:
                    raise AwsError(f"{what} is still in use after {int(self.wait_timeout)} s ({error_code(exc)})",
                                   "run the command again later; if it stays in use, something fabula did not make "
                                   "uses it: remove that in the AWS console") from None
            self.sleep(delay)
            delay = min(delay * 1.5, 20)


def quiet_sdk_logs() -> None:
    """botocore logs every request's body at DEBUG (a SecureString's value among them): whatever
    the process's logging is set to, its loggers and boto3's say nothing below INFO."""
    for name in ("botocore", "boto3", "s3transfer"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def described(describe: Any, key: str, missing: str, **names: Any) -> list[dict[str, Any]]:
    """What a describe call by name finds: AWS answers a name it does not know with the error
    `missing` rather than an empty list."""
    try:
        return list(describe(**names)[key])
    except ClientError as exc:
        if error_code(exc) != missing:
            raise
        return []


def is_not_found(exc: ClientError) -> bool:
    """The resource is gone (or never was): what a re-run of destroy meets."""
    code = error_code(exc)
    return "NotFound" in code or code in ("NoSuchKey", "NoSuchEntity", "ResourceNotFoundException",
                                          "ParameterNotFound", "404")


def _fix(code: str, operation: str) -> str:
    service, _, call = operation.partition(".")
    if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "Forbidden") or \
            "NotAuthorized" in code:
        return (f"allow `{service}:{call}` in the IAM policy of the credentials fabula uses (the README's "
                "\"On AWS\" section has the whole policy), then run the command again")
    if code in ("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "ExpiredToken",
                "ExpiredTokenException", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
        return "give fabula valid AWS credentials (AWS_PROFILE, or `aws sso login`), then run the command again"
    if "LimitExceeded" in code or "Quota" in code or code in ("TooManyLoadBalancers", "TooManyTargetGroups",
                                                               "VcpuLimitExceeded", "InsufficientInstanceCapacity"):
        return ("raise the quota in the AWS console (Service Quotas) or remove resources you no longer use, "
                "then run the command again: what exists is kept")
    if code.startswith("InvalidAMIID"):
        return "give `aws.ami` an image of this region (or leave it out for Debian 12's current one)"
    if code == "Throttling" or code == "RequestLimitExceeded":
        return "AWS is throttling this account's calls: wait a minute and run the command again"
    return "correct what AWS names above and run the command again: what exists is kept, what is missing is made"


def translate(exc: ClientError | BotoCoreError, counter: CallCounter | None) -> AwsError:
    """AWS's error as fabula's: the call that failed, AWS's code and message, and the fix."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        operation = counter.last if counter and counter.last.endswith("." + exc.operation_name) else \
            f"aws.{exc.operation_name}"
        message = "" if exc.operation_name in QUIET_OPERATIONS else \
            ": " + cut(str(exc.response.get("Error", {}).get("Message", "")), 300)
        return AwsError(f"AWS call {operation} failed ({code}){message}", _fix(code, operation))
    # no answer at all: no credentials, no network, an endpoint that does not answer
    operation = counter.last if counter and counter.last else "an AWS call"
    return AwsError(f"{operation} failed: {cut(str(exc), 300)}",
                    "check the AWS credentials and region fabula uses, and that AWS (or AWS_ENDPOINT_URL) answers")


P = ParamSpec("P")
R = TypeVar("R")


def aws_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn AWS's errors in a step (whose first argument is the Cloud) into fabula's."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            # the step's Cloud: its first argument, or that argument's `cloud` (a method's self)
            first = args[0] if args else None
            cloud = first if isinstance(first, Cloud) else getattr(first, "cloud", None)
            raise translate(exc, cloud.counter if isinstance(cloud, Cloud) else None) from None
    return wrapper
