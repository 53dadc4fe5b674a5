"""A bounded client loop through the load balancer that records what the app acknowledged."""
from __future__ import annotations

import threading
import time
import uuid

import httpx


class WriteLoad(threading.Thread):
    """POSTs entries with unique texts until stopped (or max_seconds); keeps each acknowledged
    text (201) and each failure, with the time it happened."""

    def __init__(self, url: str, max_seconds: float = 300, max_requests: int = 50000):
        super().__init__(daemon=True)
        self.url, self.max_seconds, self.max_requests = url, max_seconds, max_requests
        self.acknowledged: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self.stop_event = threading.Event()
        self.run_id = uuid.uuid4().hex[:8]

    def run(self) -> None:
        started = time.monotonic()
        with httpx.Client(verify=False, timeout=10) as http:
            for n in range(self.max_requests):
                if self.stop_event.is_set() or time.monotonic() - started > self.max_seconds:
                    return
                text = f"load-{self.run_id}-{n}"
                try:
                    response = http.post(self.url + "/api/entries", data={"text": text})
                    if response.status_code == 201:
                        self.acknowledged.append((time.monotonic(), text))
                    else:
                        self.failures.append((time.monotonic(), f"HTTP {response.status_code}"))
                except httpx.HTTPError as exc:
                    self.failures.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)

    def acknowledged_since(self, moment: float) -> int:
        return sum(1 for at, _ in self.acknowledged if at > moment)

    def longest_gap(self) -> float:
        times = [at for at, _ in self.acknowledged]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class RequestLoad:
    """Steady GET load through the load balancer from two threads: one keeps its connection
    alive, one opens a new connection for every request. Records every outcome."""

    def __init__(self, url: str, path: str = "/api/info", max_seconds: float = 300):
        self.url, self.path, self.max_seconds = url, path, max_seconds
        self.outcomes: list[tuple[float, str, str]] = []   # (time, status or error, release)
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(keep,), daemon=True) for keep in (True, False)]
        self._lock = threading.Lock()

    def _record(self, outcome: str, release: str = "") -> None:
        with self._lock:
            self.outcomes.append((time.monotonic(), outcome, release))

    def _one(self, http: httpx.Client) -> None:
        try:
            response = http.get(self.url + self.path)
            release = response.json().get("release", "") if response.status_code == 200 else ""
            self._record(str(response.status_code), release)
        except (httpx.HTTPError, ValueError) as exc:
            self._record(type(exc).__name__)

    def _run(self, keep_alive: bool) -> None:
        started = time.monotonic()
        client = httpx.Client(verify=False, timeout=15) if keep_alive else None
        try:
            while not self.stop_event.is_set() and time.monotonic() - started < self.max_seconds:
                if keep_alive:
                    self._one(client)
                else:
                    with httpx.Client(verify=False, timeout=15) as http:
                        self._one(http)
                time.sleep(0.005)
        finally:
            if client:
                client.close()

    def __enter__(self) -> RequestLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for _, outcome, _ in self.outcomes:
            found[outcome] = found.get(outcome, 0) + 1
        return found
