"""The environment's shared files in S3 (`aws.state_bucket`, under `<project>/<env>/`): its state,
history and lock, written with S3's conditional writes so that a team shares them safely.

- A new object is written with `If-None-Match: *`: of two writers, one wins, the other gets
  412 PreconditionFailed. That is the lock: `lock.json` made this way is held by whoever made it.
- A replacement is written with `If-Match: <ETag>` of the version read: a writer who read an older
  version loses instead of overwriting the other's change (a lost update).
- The lock is let go with a DeleteObject `If-Match` its own ETag, so a holder whose lock was
  taken over (stale: no heartbeat for `stale_after` seconds) never removes its successor's.

moto 5.2.5 enforces all three (PutObject If-None-Match and If-Match, DeleteObject If-Match:
412 PreconditionFailed), as S3 does since 2024-11; the unit tests check each.

The bucket is the team's, shared by environments and outliving them: fabula makes it when it is
missing (private, versioned) but never tags it as an environment's nor removes it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from fabula.errors import FabulaError
from fabula.providers.aws.cloud import Cloud, aws_errors, error_code

LOCK = "lock.json"
CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict")


class StateConflict(FabulaError):
    """Another writer changed the object since it was read."""


@dataclass(frozen=True)
class Stored:
    data: bytes
    etag: str


class StateBucket:
    def __init__(self, cloud: Cloud, bucket: str, *, clock: Callable[[], float] = time.time):
        self.cloud = cloud
        self.bucket = bucket
        self.prefix = f"{cloud.project}/{cloud.env}/"
        self.clock = clock
        self._lock_etag: str | None = None   # the ETag of the lock object this process wrote

    def key(self, name: str) -> str:
        return self.prefix + name

    @aws_errors
    def ensure_bucket(self) -> bool:
        """Make the bucket if missing (private, versioned: every state ever written can be read
        back); True if it was made."""
        s3 = self.cloud.s3
        try:
            s3.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        where = {} if self.cloud.region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": self.cloud.region}}
        s3.create_bucket(Bucket=self.bucket, **where)
        s3.put_public_access_block(Bucket=self.bucket, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True})
        s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        return True

    @aws_errors
    def read(self, name: str) -> Stored | None:
        try:
            answer = self.cloud.s3.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return Stored(answer["Body"].read(), str(answer["ETag"]))

    @aws_errors
    def write(self, name: str, data: bytes, *, replacing: str | None) -> str:
        """Write `name`: new (`replacing` None: refused if it exists) or over the version whose
        ETag is `replacing` (refused if it changed meanwhile). Returns the new ETag; raises
        StateConflict when another writer was first."""
        condition = {"IfNoneMatch": "*"} if replacing is None else {"IfMatch": replacing}
        try:
            answer = self.cloud.s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, **condition)
        except ClientError as exc:
            if error_code(exc) in CONFLICT:
                raise StateConflict(f"s3://{self.bucket}/{self.key(name)} was changed by another command",
                                    "run the command again: it reads the other's version first") from None
            raise
        return str(answer["ETag"])

    # -- the lock ----------------------------------------------------------------------------------
    def _record(self, holder: dict[str, Any]) -> bytes:
        return json.dumps({**holder, "heartbeat": self.clock()}, sort_keys=True).encode()

    @aws_errors
    def acquire(self, holder: dict[str, Any], *, stale_after: float = 120) -> dict[str, Any] | None:
        """Take the lock for `holder`: None when taken, else the record of whoever holds it. A
        lock without a heartbeat for `stale_after` seconds is taken over (if two take it over at
        once, the If-Match lets one win)."""
        try:
            self._lock_etag = self.write(LOCK, self._record(holder), replacing=None)
            return None
        except StateConflict:
            pass
        current = self.read(LOCK)
        if current is None:  # let go meanwhile: try once more
            try:
                self._lock_etag = self.write(LOCK, self._record(holder), replacing=None)
                return None
            except StateConflict:
                return self.holder() or {}
        record = _parse(current.data)
        if self.clock() - float(record.get("heartbeat", 0)) < stale_after:
            return record
        try:
            self._lock_etag = self.write(LOCK, self._record(holder), replacing=current.etag)
            return None
        except StateConflict:
            return self.holder() or {}

    @aws_errors
    def heartbeat(self, holder: dict[str, Any]) -> None:
        """Say the lock is still held; a StateConflict if it was taken over meanwhile."""
        if self._lock_etag is None:
            raise StateConflict("this command does not hold the lock", "take the lock first")
        self._lock_etag = self.write(LOCK, self._record(holder), replacing=self._lock_etag)

    @aws_errors
    def release(self) -> bool:
        """Let the lock go if it is still this process's; False if it was taken over (left as is)."""
        if self._lock_etag is None:
            return False
        etag, self._lock_etag = self._lock_etag, None
        try:
            self.cloud.s3.delete_object(Bucket=self.bucket, Key=self.key(LOCK), IfMatch=etag)
        except ClientError as exc:
            if error_code(exc) in CONFLICT:
                return False
            if error_code(exc) in ("NoSuchKey", "404"):
                return False
            raise
        return True

    @aws_errors
    def holder(self) -> dict[str, Any] | None:
        current = self.read(LOCK)
        return None if current is None else _parse(current.data)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
