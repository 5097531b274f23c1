"""Engines: a job whose worker process dies fails alone, on the process pool and on Ray."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from onnx_merge.engines import run_jobs


@dataclass(frozen=True)
class Job:
    name: str
    die: str = ""  # "always": the worker dies every time; a path: dies once, leaving that file behind

    def failed(self, exc):
        return {"name": self.name, "status": "error", "error": f"{type(exc).__name__}: {exc}"}


def run(job: Job) -> dict:
    if job.die == "always" or (job.die and not Path(job.die).exists()):
        if job.die != "always":
            Path(job.die).touch()
        os._exit(3)  # as a kill or the out-of-memory killer would end it: no exception, no result
    return {"name": job.name, "status": "ok", "pid": os.getpid()}


def test_local_pool_a_dead_worker_fails_only_its_own_job():
    jobs = [Job("a"), Job("dies", "always"), Job("b"), Job("c"), Job("d")]
    rows = {r["name"]: r for r in run_jobs(jobs, run, engine="local", workers=2)}
    assert set(rows) == {"a", "dies", "b", "c", "d"}
    assert rows["dies"]["status"] == "error" and "worker process died" in rows["dies"]["error"]
    # the pool broke under the others too: they ran again, one at a time, and finished
    assert all(rows[n]["status"] == "ok" for n in "abcd")


def test_ray_a_dead_worker_is_retried_once_then_fails_its_own_job(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}})
    try:
        jobs = [Job("a"), Job("dies", "always"), Job("b"), Job("once", str(tmp_path / "died-once")), Job("c")]
        rows = {r["name"]: r for r in run_jobs(jobs, run, engine="ray", workers=2)}
    finally:
        ray.shutdown()
    assert rows["dies"]["status"] == "error" and "Worker" in rows["dies"]["error"]
    assert all(rows[n]["status"] == "ok" for n in ("a", "b", "once", "c"))
    assert (tmp_path / "died-once").exists()
