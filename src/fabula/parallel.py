"""One action on many servers at once, and one error that names every failure."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fabula.errors import FabulaError


def at_once(items: Sequence, action: Callable, name: Callable | None = None, hint: str | None = None) -> list:
    """`action(item)` for every item at once; their results in order. See `results` for errors."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(action, item) for item in items]
    return results(futures, [name(item) for item in items] if name else None, hint)


def results(futures: Sequence[Future], names: Sequence[str] | None = None, hint: str | None = None) -> list:
    """The finished `futures`' results. If one failed, its error; if several, one error with a line
    per failure (prefixed by its name), each error once: a job that waited on a failed one and
    failed with that same error is not named twice."""
    failed: dict[int, tuple[str | None, BaseException]] = {}
    for i, future in enumerate(futures):
        error = future.exception()
        if error is not None and id(error) not in failed:
            failed[id(error)] = (names[i] if names else None, error)
    if len(failed) == 1:
        raise next(iter(failed.values()))[1]
    if failed:
        raise FabulaError("\n".join(f"{n}: {e}" if n else str(e) for n, e in failed.values()), hint)
    return [future.result() for future in futures]
