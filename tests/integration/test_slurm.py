"""`sbatch slurm/train_market.sh` on real slurmctld/slurmd daemons: a throwaway cluster on
127.0.0.1 (one node, and two nodes on one machine), a 2-rank job that completes, a pre-emption by
SIGUSR1 that checkpoints, requeues and resumes to bit-identical weights, and the host-list parser
against `scontrol show hostnames`; `sbatch slurm/eval.sh` evaluating that run's checkpoint sharded
over two nodes, equal to one process; `sbatch slurm/bench.sh` benchmarking one and two nodes
and summarising their scaling; `sbatch slurm/tune.sh` running a Ray Tune search on a Ray cluster
over two nodes.

Needs root and Debian's slurmctld/slurmd/slurm-client (tests/run.sh installs them where it can).
Without them the tests skip loudly; in CI (CI=true) or with HPC_REID_REQUIRE_SLURM=1 that is a
failure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hpc_reid.data.synthetic import SynthSpec, generate
from hpc_reid.engine.checkpoint import CheckpointManager, load_checkpoint
from hpc_reid.engine.saved import evaluate_checkpoint
from hpc_reid.launch.distributed import expand_hostlist
from tests.ports import free_port
from tests.tiny import TINY_BATCH, TINY_DATA, TINY_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
MARKET_FOLDER = "Market-1501-v15.09.15"  # what slurm/train_market.sh expects under $DATA_ROOT
# The TINY run of tests/engine/test_trainer.py on a market1501-format folder, 2 ranks x 4 epochs
# of 4 batches (P=2 x K=2 per rank, 16 training identities).
EXTRA = [
    "data.height=64",
    "data.width=32",
    "model.backbone=osnet_x0_25",
    "sampler.num_identities=2",
    "sampler.num_instances=2",
    "sampler.passes_per_epoch=1",
    "loader.backend=torch",
    "loader.num_workers=0",
    "loader.test_batch_size=64",
    "schedule.epochs=4",
    "schedule.milestones=[2]",
    "schedule.warmup_epochs=1",
    "evaluation.every_epochs=0",
    "evaluation.plots=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every=1",
    "engine.device=cpu",
]
STEPS = 16
DAEMONS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _require_slurm() -> None:
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    reason = None
    if missing:
        reason = f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurmctld "
        reason += "slurmd slurm-client, or run bash tests/run.sh as root"
    elif os.geteuid() != 0:
        reason = "the throwaway SLURM cluster runs its daemons as root; not root here"
    if reason is None:
        return
    if os.environ.get("HPC_REID_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true":
        pytest.fail(f"CI=true or HPC_REID_REQUIRE_SLURM=1, but {reason}", pytrace=False)
    pytest.skip(f"SKIPPING SLURM INTEGRATION TESTS: {reason}")


class Cluster:
    """slurmctld + one slurmd per node, all in the foreground as our children, state in ``root``."""

    def __init__(self, root: Path, nodes: list[str]):
        self.root, self.nodes = root, nodes
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname()
        # a random first job id: MASTER_PORT is derived from it, so clusters of concurrent test
        # sessions do not rendezvous on the same port
        first_job = random.randint(1000, 19000)
        lines = [
            "ClusterName=hpcreid",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            f"FirstJobId={first_job}",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=600",
            f"StateSaveLocation={root}/state",
            f"SlurmdSpoolDir={root}/spool-%n",
            f"SlurmctldPidFile={root}/slurmctld.pid",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/slurmctld.log",
            f"SlurmdLogFile={root}/slurmd-%n.log",
        ]
        for node in nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                "CPUs=2 RealMemory=4000"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        (root / "state").mkdir(parents=True)
        self.conf.write_text("\n".join(lines) + "\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    def start(self, timeout_s: float = 30.0) -> None:
        def daemon(*cmd: str) -> None:
            log = open(self.root / f"{cmd[0]}-{len(self.procs)}.stderr", "w")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            )

        daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in self.nodes:
            daemon("slurmd", "-D", "-f", str(self.conf), "-N", node)
        self.wait_idle(timeout_s)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Poll ``sinfo`` until every node is idle (not down, allocated or completing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SLURM daemon exited: {dead}\n{self.logs()}")
            time.sleep(0.25)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s} s: {states}\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, **kw)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout_s: float, until=lambda job: False) -> dict[str, str]:
        """Poll until the job ends (or ``until(job)``); scancel it and fail on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in TERMINAL or until(job):
                return job
            time.sleep(0.2)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout_s} s")

    def logs(self) -> str:
        return "\n".join(
            f"== {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        self.run("scancel", "--full", "--state=RUNNING", "--user=root", check=False)
        self.run("scancel", "--user=root", check=False)
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # slurmd double-forks one slurmstepd per step: ours hold our slurmd log file open
        for pid in _slurmstepd_using(self.root):
            os.kill(pid, signal.SIGKILL)


def _slurmstepd_using(root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "slurmstepd":
                continue
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(fd.startswith(str(root)) for fd in fds):
            pids.append(int(proc.name))
    return pids


def _cluster(tmp_path_factory, nodes: list[str]) -> Iterator[Cluster]:
    _require_slurm()
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Iterator[Cluster]:
    yield from _cluster(tmp_path_factory, ["node01"])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[Cluster]:
    yield from _cluster(tmp_path_factory, ["n1", "n2"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    spec = SynthSpec(ids=32, cams=3, images_per_id=6, distractors=4, junk=2, height=64, width=32)
    generate(root / MARKET_FOLDER, spec)
    return root


def sbatch(cluster: Cluster, workdir: Path, data_root: Path, *options: str) -> str:
    env = {
        "DATA_ROOT": str(data_root),
        "EXTRA": " ".join(f"--set {s}" for s in EXTRA),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    cmd = ["sbatch", "--parsable", *options, str(REPO / "slurm/train_market.sh")]
    done = cluster.run(*cmd, cwd=workdir, env={**cluster.env, **env})
    return done.stdout.strip().split(";")[0]


def weights(run: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = load_checkpoint(CheckpointManager(run).latest())
    return state["step"], state["strategy"]["model"]


def job_output(workdir: Path, job_id: str) -> str:
    return (workdir / f"bot-market-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def straight_job(two_nodes, data_root, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """One uninterrupted `sbatch -N 2 slurm/train_market.sh`: the reference run."""
    workdir = tmp_path_factory.mktemp("straight")
    job_id = sbatch(two_nodes, workdir, data_root, "-N", "2")
    job = two_nodes.wait(job_id, timeout_s=120)
    return workdir, job_id, job


@pytest.mark.slow
def test_train_market_on_two_nodes_completes_with_two_ranks(straight_job):
    workdir, job_id, job = straight_job
    output = job_output(workdir, job_id)
    assert job["JobState"] == "COMPLETED", output
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    assert "2 node(s) x 1 task(s), rendezvous 127.0.0.1:" in output  # n1 does not resolve
    run = workdir / "runs" / f"job-{job_id}"
    state = load_checkpoint(CheckpointManager(run).latest())
    assert state["world_size"] == 2 and state["step"] == STEPS
    assert (run / "metrics.jsonl").stat().st_size > 0
    assert (run / "results.json").is_file() and (run / "config.yaml").is_file()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_identical_weights(
    two_nodes, data_root, straight_job, tmp_path_factory
):
    workdir = tmp_path_factory.mktemp("preempted")
    job_id = sbatch(two_nodes, workdir, data_root, "-N", "2")
    run = workdir / "runs" / f"job-{job_id}"
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    # signal once the trainer logged its first steps (its handler is installed by then)
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, job_output(workdir, job_id)
        assert two_nodes.job(job_id)["JobState"] not in TERMINAL, job_output(workdir, job_id)
        time.sleep(0.05)
    # without --batch/--full, scancel signals the job's steps (the srun'ed tasks), not the shell
    two_nodes.run("scancel", "--signal=USR1", job_id)
    requeued = two_nodes.wait(
        job_id, timeout_s=60, until=lambda j: j["JobState"] == "PENDING" and j["Restarts"] == "1"
    )
    assert requeued["JobState"] == "PENDING", job_output(workdir, job_id)
    # SLURM holds a requeued job for 120 s (Reason=BeginTime); release it, as an admin can, once
    # the old allocation is cleaned up (a start on still-completing nodes fails the job)
    assert requeued["Reason"] == "BeginTime"
    two_nodes.wait_idle()
    # slurmd remembers the requeued job's credential as revoked at a time in whole seconds and
    # refuses ("Job credential revoked") one created in that same second: start 2 s later
    time.sleep(2.0)
    two_nodes.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = two_nodes.wait(job_id, timeout_s=120)
    output = job_output(workdir, job_id)
    assert job["JobState"] == "COMPLETED", output
    assert job["Restarts"] == "1", output
    assert "checkpoint (stop)" in output and f"scontrol requeue {job_id}" in output, output
    stopped = [line for line in output.splitlines() if "stopped by signal at step" in line]
    assert len(stopped) == 1 and int(stopped[0].split("step ")[1].split()[0]) < STEPS, output
    straight_workdir, straight_id, _ = straight_job
    step_a, a = weights(straight_workdir / "runs" / f"job-{straight_id}")
    step_b, b = weights(run)
    assert step_a == step_b == STEPS
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


HOSTLISTS = ["node[01-04,07]", "a[1-2]-b[3-4]", "gpu-[001-003],login1", "x[8-11],y,z[099-101]"]


@pytest.mark.parametrize("hostlist", HOSTLISTS)
def test_expand_hostlist_matches_scontrol_show_hostnames(one_node, hostlist):
    out = one_node.run("scontrol", "show", "hostnames", hostlist).stdout.split()
    assert expand_hostlist(hostlist) == out


def test_srun_tasks_see_their_rank_and_the_allocation(one_node):
    """Two tasks on one real node: detect_env reads SLURM_PROCID/NTASKS/LOCALID and the nodes."""
    code = (
        "from hpc_reid.launch.distributed import detect_env; e = detect_env(); "
        "print(e.launcher, e.rank, e.world_size, e.local_rank, e.master_addr)"
    )
    env = {**one_node.env, "PYTHONPATH": str(REPO)}
    done = one_node.run("srun", "-n", "2", sys.executable, "-c", code, env=env)
    assert sorted(done.stdout.splitlines()) == ["slurm 0 2 0 node01", "slurm 1 2 1 node01"]


@pytest.mark.slow
def test_a_real_error_fails_the_job_without_requeue(two_nodes, data_root, tmp_path):
    env_extra = ["--set", "data.root=/nonexistent/market"]  # a data set error: exit code 2
    workdir = tmp_path
    cmd = ["sbatch", "--parsable", "-N", "2", str(REPO / "slurm/train_market.sh")]
    env = {**two_nodes.env, "DATA_ROOT": str(data_root), "PYTHON": sys.executable}
    env["EXTRA"] = " ".join([*(f"--set {s}" for s in EXTRA), *env_extra])
    job_id = two_nodes.run(*cmd, cwd=workdir, env=env).stdout.strip().split(";")[0]
    job = two_nodes.wait(job_id, timeout_s=60)
    output = job_output(workdir, job_id)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", output
    assert job["ExitCode"] != "0:0" and "scontrol requeue" not in output, output


@pytest.mark.slow
def test_eval_sh_shards_a_checkpoint_over_two_nodes_like_one_process(
    two_nodes, straight_job, tmp_path
):
    """`CHECKPOINT=... sbatch -N 2 slurm/eval.sh`: both ranks evaluate, as one process would."""
    train_dir, train_id, _ = straight_job
    checkpoint = CheckpointManager(train_dir / "runs" / f"job-{train_id}").latest()
    assert checkpoint is not None
    env = {**two_nodes.env, "CHECKPOINT": str(checkpoint), "PYTHON": sys.executable}
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["sbatch", "--parsable", "-N", "2", str(REPO / "slurm/eval.sh")]
    job_id = two_nodes.run(*cmd, cwd=tmp_path, env=env).stdout.strip().split(";")[0]
    job = two_nodes.wait(job_id, timeout_s=60)
    output = (tmp_path / f"hpc-reid-eval-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", output
    assert job["NodeList"] == "n[1-2]", output
    assert "2 node(s) x 1 task(s), rendezvous 127.0.0.1:" in output
    # each srun'ed task logs itself before it becomes the Python process (a world of 2 that
    # completed means both joined the rendezvous)
    assert "hpc-reid: rank 0 of 2 on n1" in output and "hpc-reid: rank 1 of 2 on n2" in output
    sharded = json.loads((tmp_path / "runs" / f"eval-{job_id}" / "results.json").read_text())
    summary = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "one-process")
    single = json.loads((tmp_path / "one-process" / "results.json").read_text())
    assert single.keys() == sharded.keys() and set(summary) <= set(single)
    for key, value in single.items():
        assert sharded[key] == pytest.approx(value, abs=1e-6), key
    assert summary["mAP"] == pytest.approx(sharded["mAP"], abs=1e-6)


@pytest.mark.parametrize(
    ("checkpoint", "error"),
    [(None, "set CHECKPOINT to a checkpoint"), ("/nonexistent/step-1.pt", "CHECKPOINT not found")],
)
def test_eval_sh_needs_an_existing_checkpoint(checkpoint, error, tmp_path):
    """A clear error before anything is launched (no SLURM needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CHECKPOINT"))}
    if checkpoint:
        env["CHECKPOINT"] = checkpoint
    cmd = ["bash", str(REPO / "slurm/eval.sh")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and error in done.stderr, done.stderr


@pytest.mark.slow
def test_bench_sh_runs_one_and_two_nodes_and_summarises_their_scaling(two_nodes, tmp_path):
    """`sbatch -N 2 slurm/bench.sh`: nodes-1 (one rank) and nodes-2 (a rank on n1 and on n2),
    then scaling.json/.md/.png beside them."""
    tiny = [
        *TINY_DATA,
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "sampler.num_identities=2",
        "sampler.num_instances=2",
        "loader.num_workers=0",
        "engine.device=cpu",
    ]
    env = {**two_nodes.env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.update(STEPS="2", WARMUP="1", LOADERS="torch", EVAL_SIZE="40,120")
    env["EXTRA"] = " ".join(f"--set {s}" for s in tiny)
    cmd = ["sbatch", "--parsable", "-N", "2", str(REPO / "slurm/bench.sh")]
    job_id = two_nodes.run(*cmd, cwd=tmp_path, env=env).stdout.strip().split(";")[0]
    job = two_nodes.wait(job_id, timeout_s=120)
    output = (tmp_path / f"hpc-reid-bench-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", output
    assert "hpc-reid: rank 0 of 2 on n1" in output and "hpc-reid: rank 1 of 2 on n2" in output
    out = tmp_path / "runs" / f"bench-{job_id}"
    runs = [json.loads((out / f"nodes-{k}" / "bench.json").read_text()) for k in (1, 2)]
    assert [r["environment"]["nodes"] for r in runs] == [1, 2]
    assert [r["environment"]["world_size"] for r in runs] == [1, 2]
    assert runs[1]["environment"]["node_names"] == ["n1", "n2"]
    assert runs[1]["environment"]["slurm_job_id"] == job_id
    assert runs[1]["aggregate"]["comm"]["model"]["measured_allreduce_s"] > 0
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    assert [(r["nodes"], r["ranks"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[0]["compute_efficiency"] == pytest.approx(1.0)
    assert rows[1]["compute_efficiency"] == pytest.approx(
        runs[1]["aggregate"]["compute"]["img_per_s"]
        / (2 * runs[0]["aggregate"]["compute"]["img_per_s"])
    )
    assert (out / "scaling.md").read_text().startswith("| scaling | nodes |")
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"


# A 2-trial search of tiny synthetic trainings (the TINY run of tests/engine/test_trainer.py).
TUNE_SETS = [
    *TINY_DATA,
    *TINY_BATCH,
    *TINY_SCHEDULE,
    "evaluation.every_epochs=1",
    "evaluation.at_start=false",
    "evaluation.plots=false",
    "logging.tensorboard=false",
    "engine.device=cpu",
]
TUNE_SPACE = """\
parameters:
  optimizer.lr: {type: range, bounds: [1.0e-3, 1.0e-2], log: true}
  loss.triplet.margin: {type: range, bounds: [0.1, 0.5]}
"""


@pytest.mark.slow
def test_tune_sh_runs_a_search_on_a_ray_cluster_over_two_nodes(two_nodes, tmp_path):
    """`sbatch -N 2 slurm/tune.sh`: Ray head on n1, a worker on n2, both joined; 2 trials of 2
    CPUs at once (one per 2-CPU node) complete; the Ray steps end with the job."""
    (tmp_path / "space.yaml").write_text(TUNE_SPACE)
    sets = [*TUNE_SETS, f"data.synthetic.cache_dir={tmp_path / 'cache'}"]
    env = {**two_nodes.env, "PYTHON": sys.executable, "CONFIG": "configs/synthetic/bot.yaml"}
    env.update(SPACE=str(tmp_path / "space.yaml"), TRIALS="2", CONCURRENT="2")
    extra = [*(f"--set {s}" for s in sets), "--cpus-per-trial 2", "--no-early-stopping"]
    env["EXTRA"] = " ".join(extra)
    cmd = ["sbatch", "--parsable", "-N", "2", str(REPO / "slurm/tune.sh")]
    job_id = two_nodes.run(*cmd, cwd=tmp_path, env=env).stdout.strip().split(";")[0]
    job = two_nodes.wait(job_id, timeout_s=240)
    output = (tmp_path / f"hpc-reid-tune-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", output
    assert job["NodeList"] == "n[1-2]", output
    # `ray status` once both nodes joined, and the cluster the search ran on
    active = output.split("Active:")[1].split("Pending:")[0]
    assert active.count(" node_") == 2, output
    assert "Ray cluster of 2 node(s), 4 CPUs" in output, output
    folder = tmp_path / "runs/tune/bot_synthetic"
    table = (folder / "results.csv").read_text().splitlines()
    assert len(table) == 3 and all(",completed," in line for line in table[1:]), output
    assert (folder / "best.yaml").is_file() and "best: trial" in output
    # the background `ray start` steps stopped on SIGTERM, not killed
    assert "Ray cluster stopped" in output and "Killed" not in output, output
    two_nodes.wait_idle()
