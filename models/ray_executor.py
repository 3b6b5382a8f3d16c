"""Run independent tasks as Ray tasks. The only module that imports ``ray``.

``run_tasks(fn, kwargs_list)`` calls ``fn(**kwargs)`` for every kwargs dict as one Ray task
and returns the results in order. ``fn`` must be importable (a module-level function).

Connection: ``address`` argument, else the ``RAY_ADDRESS`` environment variable, else a
Ray already initialised in this process, else a new local cluster started with:
usage stats and auth off (``RAY_USAGE_STATS_ENABLED=0``, ``RAY_AUTH_MODE=disabled``), a
short temp dir under /tmp (socket paths must stay < 108 chars), ~200 MB object store,
no dashboard. A local cluster puts the repository root on the workers' ``PYTHONPATH``
so task functions import. Starting one takes ~10 s on 2 cores.

Every task logs at the driver's level (its root logger's, read when the tasks are submitted), so
a worker's progress lines reach the driver's console (Ray forwards worker output), and a failed
task raises its original exception, as the same call would locally.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 200 * 1024 * 1024
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)

__all__ = ["EXECUTORS", "check_executor", "ensure_ray", "iter_tasks", "ray_session", "run_tasks", "shutdown_ray"]

EXECUTORS = ("local", "ray")

_started_temp_dir: str | None = None  # temp dir of the local cluster this process started


def check_executor(executor: str) -> None:
    """ValueError unless ``executor`` is ``'local'`` or ``'ray'`` (checked before any training)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")


def _set_ray_environment() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to / start Ray if needed; returns the ``ray`` module."""
    _set_ray_environment()
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
        return ray
    global _started_temp_dir
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    _started_temp_dir = temp_dir
    pythonpath = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    log.info("starting a local Ray cluster (temp dir %s)", temp_dir)
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    return ray


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping the local cluster and removing its temp dir if this process started it)."""
    global _started_temp_dir
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _started_temp_dir is not None:
        shutil.rmtree(_started_temp_dir, ignore_errors=True)
        _started_temp_dir = None


@contextmanager
def ray_session() -> Iterator[None]:
    """A block that may start Ray: a local cluster started inside it is stopped on leaving it (and
    its /tmp/ray_* folder removed); a Ray already running on entry is left running."""
    _set_ray_environment()
    import ray

    running = ray.is_initialized()
    try:
        yield
    finally:
        if not running and ray.is_initialized():
            shutdown_ray()


def configure_worker_logging(level: int) -> None:
    """Root logging at ``level`` in a worker process (a stderr handler if it has none), so the
    task's INFO lines reach the driver, which Ray forwards them to."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(message)s")
    root.setLevel(level)


def _run_logged(fn: Callable[..., Any], log_level: int, kwargs: dict[str, Any]) -> Any:
    """``fn(**kwargs)`` in a worker logging at the driver's level (the Ray task :func:`_submit` runs)."""
    configure_worker_logging(log_level)
    return fn(**kwargs)


def _original_error(exc: BaseException) -> BaseException:
    """The task's own exception for a Ray task error (its ``cause``), else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _submit(fn: Callable[..., Any], kwargs_list: Sequence[dict[str, Any]], address: str | None,
            num_cpus_per_task: float, num_gpus_per_task: float) -> tuple[Any, list[Any]]:
    """Start one Ray task per kwargs dict -> (ray module, object refs in input order)."""
    if num_cpus_per_task <= 0 or num_gpus_per_task < 0:
        raise ValueError("num_cpus_per_task must be > 0 and num_gpus_per_task >= 0")
    ray = ensure_ray(address)
    remote_fn = ray.remote(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task)(_run_logged)
    remote_fn = remote_fn.options(name=getattr(fn, "__name__", "task"))
    level = logging.getLogger().getEffectiveLevel()
    return ray, [remote_fn.remote(fn, level, kwargs) for kwargs in kwargs_list]


def run_tasks(
    fn: Callable[..., Any],
    kwargs_list: Sequence[dict[str, Any]],
    *,
    address: str | None = None,
    num_cpus_per_task: float = 1,
    num_gpus_per_task: float = 0.0,
) -> list[Any]:
    """``[fn(**kw) for kw in kwargs_list]``, each call one Ray task; results in input order.

    A failing task raises its original exception (as Ray re-raises it) after the other
    tasks have been waited for, so their outputs are complete on disk.
    """
    ray, refs = _submit(fn, kwargs_list, address, num_cpus_per_task, num_gpus_per_task)
    ray.wait(refs, num_returns=len(refs))
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:  # its message is the remote traceback: raise the task's own
        raise _original_error(err) from None


def iter_tasks(
    fn: Callable[..., Any],
    kwargs_list: Sequence[dict[str, Any]],
    *,
    address: str | None = None,
    num_cpus_per_task: float = 1,
    num_gpus_per_task: float = 0.0,
) -> Iterator[tuple[int, Any]]:
    """Like ``run_tasks``, but yields ``(index, result)`` as each task finishes (completion order),
    so the caller can store every finished result before a later one fails.

    A failing task does not stop the others: their results are still yielded, and the first
    failure is raised (its original exception) once every task has finished. Tasks still running
    when the caller stops iterating (closes the generator, or raises out of its loop) are cancelled
    (their worker processes killed: a task that only returns its result loses nothing else).
    """
    ray, refs = _submit(fn, kwargs_list, address, num_cpus_per_task, num_gpus_per_task)
    index_of = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    first_error: BaseException | None = None
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result = ray.get(ref)
                except Exception as exc:  # re-raised after the other tasks have finished
                    first_error = first_error or _original_error(exc)
                    continue
                yield index_of[ref], result
    finally:
        for ref in pending:  # the consumer stopped early (an error, a break): stop the rest
            ray.cancel(ref, force=True)
    if first_error is not None:
        raise first_error from None
