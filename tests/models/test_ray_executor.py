import json

import pytest

from models.ray_executor import iter_tasks, run_tasks


def test_rejects_bad_resources_before_starting_ray():
    with pytest.raises(ValueError, match="num_cpus_per_task"):
        run_tasks(dict, [{}], num_cpus_per_task=0)
    with pytest.raises(ValueError, match="num_gpus_per_task"):
        run_tasks(dict, [{}], num_gpus_per_task=-1)


@pytest.mark.slow
def test_run_tasks_keeps_order_and_raises_task_errors(ray_cluster):
    out = run_tasks(json.loads, [{"s": f"[{i}, {i * i}]"} for i in range(4)], num_cpus_per_task=0.5)
    assert out == [[0, 0], [1, 1], [2, 4], [3, 9]]
    with pytest.raises(ValueError):  # json.JSONDecodeError, re-raised from the task
        run_tasks(json.loads, [{"s": "[1]"}, {"s": "{not json"}])


@pytest.mark.slow
def test_iter_tasks_yields_every_finished_task_before_raising(ray_cluster):
    kwargs = [{"s": "[1]"}, {"s": "{not json"}, {"s": "[3]"}]
    seen = {}
    with pytest.raises(ValueError):  # the failed task, raised once the others are yielded
        for index, result in iter_tasks(json.loads, kwargs, num_cpus_per_task=0.5):
            seen[index] = result
    assert seen == {0: [1], 2: [3]}


@pytest.mark.slow
def test_iter_tasks_stopped_early_cancels_the_rest(ray_cluster):
    import subprocess
    import time

    # one CPU a task on the 2-CPU cluster: uncancelled, the sleeps would hold both CPUs for 30 s
    tasks = iter_tasks(subprocess.call, [{"args": ["true"]}] + [{"args": ["sleep", "30"]}] * 2,
                       num_cpus_per_task=1)
    t0 = time.perf_counter()
    assert next(tasks) == (0, 0)
    tasks.close()  # the two sleeps are cancelled, not waited for
    assert run_tasks(json.loads, [{"s": "[2]"}], num_cpus_per_task=1) == [[2]]
    assert time.perf_counter() - t0 < 20


def test_a_task_error_is_raised_as_the_tasks_own_exception(monkeypatch):
    """Ray's RayTaskError prints the remote traceback; run_tasks and iter_tasks raise what the task raised."""
    from ray.exceptions import RayTaskError

    from models import ray_executor

    class FailingRay:
        exceptions = __import__("ray").exceptions

        def wait(self, refs, num_returns):
            return refs[:num_returns], refs[num_returns:]

        def get(self, refs):
            raise RayTaskError("train_member_task", "Traceback (most recent call last):\n ...",
                               ValueError("member_000/checkpoint.pt: unreadable checkpoint"))

        def cancel(self, ref, force):
            pass

    monkeypatch.setattr(ray_executor, "_submit", lambda *args: (FailingRay(), ["ref"]))
    for call in (run_tasks, lambda *a: list(iter_tasks(*a))):
        with pytest.raises(ValueError) as info:
            call(dict, [{}])
        assert type(info.value) is ValueError and str(info.value) == "member_000/checkpoint.pt: unreadable checkpoint"


def test_a_task_logs_at_the_drivers_level(monkeypatch, capsys):
    """A worker process has no logging set up: the task wrapper sets it to the driver's level."""
    import logging

    from models.ray_executor import _run_logged

    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    _run_logged(logging.getLogger("models.image_flow").info, logging.INFO, {"msg": "flow step 1 loss 0.5"})
    assert "flow step 1 loss 0.5" in capsys.readouterr().err


def test_ray_session_stops_only_a_cluster_started_inside_it(monkeypatch):
    import sys
    import types

    from models import ray_executor

    fake = types.SimpleNamespace(running=False)
    fake.is_initialized = lambda: fake.running
    monkeypatch.setitem(sys.modules, "ray", fake)
    stopped = []
    monkeypatch.setattr(ray_executor, "shutdown_ray", lambda: stopped.append(True))
    with ray_executor.ray_session():
        fake.running = True  # started a local cluster
    assert stopped == [True]
    with ray_executor.ray_session():  # running on entry: left running
        pass
    assert stopped == [True]


@pytest.mark.slow
def test_workers_log_at_the_drivers_level_and_raise_plain_errors(ray_cluster, caplog):
    import logging

    caplog.set_level(logging.INFO)
    # the worker's root logger (a logger pickles by name): at the driver's INFO, not Ray's default WARNING
    probe = {"self": logging.getLogger(), "level": logging.INFO}
    assert run_tasks(logging.Logger.isEnabledFor, [probe], num_cpus_per_task=0.5) == [True]
    with pytest.raises(json.JSONDecodeError) as info:
        run_tasks(json.loads, [{"s": "{not json"}], num_cpus_per_task=0.5)
    assert "ray::" not in str(info.value)
