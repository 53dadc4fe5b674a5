"""The team's shared store on AWS: the S3 state bucket (statebucket.py). The lock is its
conditional-write lock object, kept alive by a heartbeat thread while held (a holder that dies
stops beating, and after STALE seconds the next command takes the lock over, naming it as cut
off); the shared files (state, history, secrets, certificate authority) are one tar object,
replaced only over the version this command read (If-Match), so two machines never silently
overwrite each other's changes."""
from __future__ import annotations

import io
import threading
from pathlib import Path

from botocore.exceptions import ClientError

from fabula.providers.aws.cloud import aws_errors, error_code
from fabula.providers.aws.statebucket import StateBucket
from fabula.providers.base import SharedStore, pack_shared, unpack_shared

FILES = "shared.tar"
HEARTBEAT = 20      # seconds between the holder's heartbeats
STALE = 120         # seconds without one before the lock is another's to take


class BucketStore(SharedStore):
    def __init__(self, bucket: StateBucket, *, heartbeat: float = HEARTBEAT, stale_after: float = STALE):
        self.bucket, self.heartbeat, self.stale_after = bucket, heartbeat, stale_after
        self.cloud = bucket.cloud   # (aws_errors finds the call counter there)
        self._etag: str | None = None            # the version of the files this command read or wrote
        self._interrupted: dict | None = None
        self._holder: dict | None = None
        self._stop: threading.Event | None = None

    # -- the lock -------------------------------------------------------------------------------
    def acquire(self, holder: dict) -> dict | None:
        self.bucket.ensure_bucket()
        before = self.bucket.holder()
        current = self.bucket.acquire(holder, stale_after=self.stale_after)
        if current is not None:
            return _without_heartbeat(current)
        # a record there before, and the lock ours now: it was stale, its holder cut off
        self._interrupted = _without_heartbeat(before) if before else None
        self._holder = holder
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop, holder), name="fabula-lock-heartbeat",
                         daemon=True).start()
        return None

    def _beat(self, stop: threading.Event, holder: dict) -> None:
        while not stop.wait(self.heartbeat):
            try:
                self.bucket.heartbeat(holder)
            except Exception:   # noqa: BLE001 - a lost heartbeat is retried; release() says if it was taken over
                continue

    def interrupted(self) -> dict | None:
        return self._interrupted

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self._holder = None
        self.bucket.release()

    def holder(self) -> dict | None:
        current = self.bucket.holder()
        return _without_heartbeat(current) if current else None

    # -- the files --------------------------------------------------------------------------------
    def _bucket_exists(self) -> bool:
        try:
            self.cloud.s3.head_bucket(Bucket=self.bucket.bucket)
            return True
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    @aws_errors
    def pull(self, files: dict[str, Path]) -> None:
        if not self._bucket_exists():
            return   # nothing shared yet: the first create makes the bucket
        stored = self.bucket.read(FILES)
        if stored is None:
            return
        self._etag = stored.etag
        unpack_shared(io.BytesIO(stored.data), files)

    @aws_errors
    def push(self, files: dict[str, Path]) -> None:
        self.bucket.ensure_bucket()
        data = io.BytesIO()
        pack_shared(files, data)
        self._etag = self.bucket.write(FILES, data.getvalue(), replacing=self._etag)


    @aws_errors
    def forget(self) -> bool:
        """Remove the shared files (the environment is destroyed); True if there were some."""
        if not self._bucket_exists() or self.bucket.read(FILES) is None:
            return False
        self.cloud.s3.delete_object(Bucket=self.bucket.bucket, Key=self.bucket.key(FILES))
        self._etag = None
        return True


def _without_heartbeat(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "heartbeat"}
