"""Launcher environment detection, SLURM host and tasks-per-node lists, and a rank's share of the
node's cores."""

from __future__ import annotations

import pytest

from hpc_reid.launch.distributed import (
    DistEnv,
    cuda_device_index,
    detect_env,
    expand_hostlist,
    local_world_size,
    rank_cores,
    slurm_tasks_per_node,
)


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[8-11]", ["a8", "a9", "a10", "a11"]),
        ("rack[1-2]-n", ["rack1-n", "rack2-n"]),
        ("n1,n2", ["n1", "n2"]),
    ],
)
def test_expand_hostlist_matches_scontrol(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_expand_hostlist_rejects_garbage():
    with pytest.raises(ValueError, match="cannot parse SLURM host list"):
        expand_hostlist("gpu[a-b]")


def test_torchrun_environment():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert detect_env(env) == DistEnv(3, 8, 1, "h", 1, "torchrun")


def test_slurm_environment_uses_first_node_and_job_port():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    got = detect_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (5, 8, 1, "slurm")
    assert got.master_addr == "gpu03"
    assert got.master_port == 15000 + 123456 % 20000


def test_slurm_master_addr_override_and_single_task():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_env({**env, "MASTER_ADDR": "127.0.0.1"}).master_addr == "127.0.0.1"
    assert detect_env({**env, "SLURM_NTASKS": "1"}) == DistEnv()  # one task: no process group


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_cleanup_leaves_a_group_it_found_to_its_creator(tmp_path):
    """Ray Train (or a test) made the group: train()'s cleanup must not destroy it; a group made
    after init_distributed (DeepSpeed makes one for a single process) is destroyed."""
    import torch.distributed as dist

    from hpc_reid.launch.distributed import cleanup, init_distributed

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        init_distributed(DistEnv(), "gloo")
        cleanup()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    init_distributed(DistEnv(), "gloo")
    dist.init_process_group("gloo", init_method=f"{store}2", rank=0, world_size=1)
    cleanup()
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("local_rank", "visible", "index"),
    [
        (0, 8, 0),  # every GPU of the node visible to every task (torchrun)
        (5, 8, 5),
        (0, 1, 0),  # SLURM --gpus-per-task=1 / --gpu-bind: each task sees its own GPU as cuda:0
        (3, 1, 0),
        (7, 1, 0),
    ],
)
def test_cuda_device_index_takes_the_visible_device_of_the_local_rank(local_rank, visible, index):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is a misconfiguration
        assert cuda_device_index(local_rank, visible) == index


def test_cuda_device_index_warns_when_local_ranks_outnumber_several_visible_gpus():
    with pytest.warns(
        RuntimeWarning, match="local rank 3 sees only 2 CUDA devices: it takes cuda:1"
    ):
        assert cuda_device_index(3, 2) == 1


def test_cuda_device_index_refuses_no_visible_device():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        cuda_device_index(0, 0)


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("8", [8]), ("4(x2)", [4, 4]), ("4(x2),3", [4, 4, 3]), ("2,1(x3),5", [2, 1, 1, 1, 5])],
)
def test_slurm_tasks_per_node_expands_repeat_counts(spec, counts):
    assert slurm_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "4(x2", "x2", "4(2)", "0", "4(x0)", "a,3"])
def test_slurm_tasks_per_node_names_a_malformed_list(spec):
    with pytest.raises(ValueError, match="SLURM tasks per node"):
        slurm_tasks_per_node(spec)


def test_local_world_size_from_torchrun_then_slurm_then_one():
    lws = local_world_size
    assert lws({}) == 1
    assert lws({"LOCAL_WORLD_SIZE": "8", "SLURM_TASKS_PER_NODE": "2(x4)"}) == 8  # torchrun
    assert lws({"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}) == 3  # this node's
    assert lws({"SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "1"}) == 4
    # the step's own distribution over the job's
    step = {"SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "8", "SLURM_NODEID": "0"}
    assert lws(step) == 2
    assert lws({"SLURM_NTASKS_PER_NODE": "6"}) == 6
    with pytest.raises(ValueError, match="SLURM_NODEID=3"):
        lws({"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "3"})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='zero'"):
        lws({"LOCAL_WORLD_SIZE": "zero"})


def test_rank_cores_divides_the_node_among_local_ranks_unless_already_bound():
    node = range(64)
    cores = rank_cores
    assert cores(node, 64, {}) == 64
    assert cores(node, 64, {"LOCAL_WORLD_SIZE": "8"}) == 8
    assert cores(node, 64, {"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}) == 8
    assert cores(range(8), 8, {"LOCAL_WORLD_SIZE": "3"}) == 2  # rounded down
    assert cores(range(4), 4, {"LOCAL_WORLD_SIZE": "8"}) == 1  # at least one
    # SLURM --cpus-per-task=8 binding: the mask holds only this task's cores already.
    assert cores(range(8, 16), 64, {"SLURM_TASKS_PER_NODE": "8"}) == 8
    assert cores(range(8, 16), 64, {"LOCAL_WORLD_SIZE": "8"}) == 8
