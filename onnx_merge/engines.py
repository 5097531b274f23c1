"""Where sweep jobs run: a local process pool or Ray tasks. No scheduling of our own: each engine
takes the jobs, runs ``run`` on each, and yields what comes back as it finishes; a job that dies
(a killed worker, a crashed task) comes back as its ``failed`` row."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

from .errors import UsageError

ENGINES = ("local", "ray")
# A Ray task whose worker process dies is run once more before its row says so: on a loaded node a
# worker can die for reasons of the node's own (start-up, the memory monitor), not the job's. Our
# jobs never raise, so only such deaths are retried.
RAY_RETRIES = 1
# BLAS and OpenMP read these when a process starts: a job gets as many threads as it is given cores
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerDied(RuntimeError):
    """A job's process ended without a result: killed, out of memory, or crashed in native code."""


@contextlib.contextmanager
def _thread_environment(threads: int):
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: str(threads) for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pool_rows(jobs: list, run: Callable, workers: int, context) -> Iterator[tuple]:
    """(job, row, None) for each job as it finishes, or (job, None, exc) where the pool broke under it."""
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = {pool.submit(run, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                yield job, future.result(), None
            except BrokenProcessPool as exc:
                yield job, None, exc
            except Exception as exc:  # the result could not come back (unpicklable, ...)
                yield job, job.failed(exc), None
    finally:  # interrupted: jobs not started yet are dropped, not waited for
        pool.shutdown(wait=True, cancel_futures=True)


def run_local(jobs: list, run: Callable, *, workers: int, threads: int) -> Iterator[dict]:
    # spawn: fresh processes that read the thread limits above (a fork would inherit the parent's
    # BLAS thread pool and onnxruntime's threads)
    context = multiprocessing.get_context("spawn")
    with _thread_environment(threads):
        lost = []
        for job, row, _ in _pool_rows(jobs, run, workers, context):
            if row is None:
                lost.append(job)
            else:
                yield row
        # A worker that dies (killed, out of memory) breaks the whole pool and every job still in it.
        # Those run again, each alone, so that only the job that kills its worker fails.
        for job in lost:
            for _, row, died in _pool_rows([job], run, 1, context):
                yield row if row is not None else job.failed(WorkerDied(f"its worker process died ({died})"))


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'onnx-merge[ray]'") from None
    return ray


def run_ray(jobs: list, run: Callable, *, workers: int | None, threads: int, address: str | None) -> Iterator[dict]:
    """Ray tasks, ``threads`` CPUs each. A cluster already initialised in this process (or at
    ``address``) is used as it is; otherwise a local one with ``workers`` x ``threads`` CPUs is
    started and shut down afterwards. At most ``workers`` jobs are in flight (None: the cluster decides)."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=(workers or os.cpu_count() or 1) * threads, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
    try:
        task = ray.remote(num_cpus=threads, max_retries=RAY_RETRIES)(run)
        queue, pending = list(jobs), {}
        limit = workers or len(queue)
        while queue or pending:
            while queue and len(pending) < limit:
                job = queue.pop(0)
                pending[task.remote(job)] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayError as exc:  # the task or its worker died
                yield job.failed(exc)
    finally:
        if started:
            ray.shutdown()


def run_jobs(jobs: Iterable, run: Callable, *, engine: str = "local", workers: int | None = None,
             threads: int = 1, address: str | None = None) -> Iterator[dict]:
    jobs = list(jobs)
    if not jobs:
        return iter(())
    if engine == "local":
        return run_local(jobs, run, workers=workers or os.cpu_count() or 1, threads=threads)
    if engine == "ray":
        return run_ray(jobs, run, workers=workers, threads=threads, address=address)
    raise UsageError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
