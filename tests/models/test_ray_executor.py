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
