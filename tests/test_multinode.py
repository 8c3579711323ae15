"""Multi-node DDP on a real 2-node SLURM cluster on this one machine (slurm/devcluster/cluster.sh
start --nodes 2: each node a slurmd in its own network, UTS and mount namespace on a private
bridge): jobs/launch.py --nodes 2, ranks on two hosts over gloo, the same weights as one host with
two processes, and a lost host (its rank killed, or its link cut) failing the job in bounded time.

One 2-node training run (the module's `reference`) serves as the uninterrupted run of every
comparison. Its settings are deterministic: no random augmentation (ffcv's flips and translations
are not seeded), one CPU thread per process (the number of threads can change the order of a
convolution's sums), so two runs of the same global batch on two processes agree bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_tools import (DETERMINISTIC, alive, assert_same_weights, cluster_processes, epochs_done, job_ended, job_state, logs,
                           rank_pids, wait_for)
from conftest import DEV_CLUSTER, REPO, start_cluster
from helpers import Result
from test_launch import launch as launch_here

# train.dist_timeout_s of these runs: how long a rank waits for a lost peer. Short, so that the cut
# link costs seconds, yet several times what a rank of these runs waits for its peer in a healthy
# run (joining, the other rank's checkpoint) on a loaded 2-core machine.
TIMEOUT_S = 10
SLACK_S = 30  # on top of it: noticing the error, tearing down, a loaded 2-core machine
# The smoke profile with 512 training images (200 of them held out: about 10 steps of 32 an epoch) for 2
# epochs, deterministic: epoch 1 ends with a checkpoint, and a kill right after it lands in epoch 2.
RUN = ["data.train_subset=512", "train.epochs=2", *DETERMINISTIC, f"train.dist_timeout_s={TIMEOUT_S}",
       "logging.mode=disabled"]


def launch(runs: Path, sweep: str, *extra: str, env: dict, wait: bool = True) -> Result:
    """jobs/launch.py --nodes 2, in this process (test_launch.launch); the ranks are SLURM's processes."""
    return launch_here("--arch", "resnet9_tiny", "--profile", "smoke", "--nodes", "2", "--cluster",
                       REPO / "slurm/multinode.yaml", "-C", "cpus_per_task=1", "--sweep", sweep, "--runs", runs,
                       *(["--wait"] if wait else []), *extra, env=env)


def job_id(runs: Path, sweep: str) -> str:
    return json.loads((runs / sweep / "sweep.json").read_text())["jobs"]["resnet9_tiny"]["job_id"]


@pytest.fixture
def two_nodes(slurm_session) -> dict:
    """The dev cluster with two nodes (node1, node2): restarted with two if it has another count;
    the single-node `slurm` fixture restarts it with one for the tests that expect that."""
    return start_cluster(2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(slurm_session, beton_dir, runs) -> Path:
    """The uninterrupted 2-node run of RUN, launched as a user would; its run folder."""
    env = start_cluster(2)
    r = launch(runs, "reference", f"data.dir={beton_dir}", *RUN, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return runs / "reference/resnet9_tiny"


# The first test needs no cluster; every other one uses it (through `slurm_session`, which marks
# it slurm and slow).
@pytest.mark.parametrize("args, message", [
    (["start", "--nodes", "0"], "cluster.sh: error: --nodes: expected a whole number from 1 to 50, got '0'"),
    (["start", "--nodes=two"], "cluster.sh: error: --nodes: expected a whole number from 1 to 50, got 'two'"),
    (["start", "--nodes"], "cluster.sh: usage: "),
    (["stop", "--nodes", "2"], "cluster.sh: usage: "),
    (["slurmd"], "cluster.sh: usage: "),
    (["slurmd", "node1", "node2"], "cluster.sh: usage: "),
])
def test_cluster_script_rejects_bad_arguments_at_once(args, message):
    r = subprocess.run(["bash", str(DEV_CLUSTER), *args], capture_output=True, text=True, timeout=10)
    assert r.returncode in (1, 2) and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(message), r.stderr


def test_a_job_of_several_tasks_ends_when_a_rank_exit_message_is_lost(beton_dir, tmp_path):
    # #22's chaos soak: a node's link down for a moment while its rank exited lost the exit
    # message, and srun kept the job running until its time limit. srun's --wait ends the step
    # while slurmctld still knows it; the batch script's watchdog kills srun once it does not.
    from helpers import run_main
    from trainer.launch.slurm import STEP_WAIT_S

    args = ["--arch", "resnet9_tiny", "--profile", "smoke", "--cluster", REPO / "slurm/multinode.yaml", "--dry-run",
            "--runs", tmp_path, "--sweep", "s", f"data.dir={beton_dir}"]
    two_nodes, one_node = (run_main("jobs/launch.py", *map(str, args), *extra) for extra in ([], ["--nodes", "1"]))
    assert two_nodes.returncode == 0 and one_node.returncode == 0, two_nodes.stderr + one_node.stderr
    srun_lines = [[line for line in r.stdout.splitlines() if line.startswith("srun ")] for r in (two_nodes, one_node)]
    assert len(srun_lines[0]) == 1 and f" --wait={STEP_WAIT_S} " in srun_lines[0][0], two_nodes.stdout[-2000:]
    assert len(srun_lines[1]) == 1 and "--wait" not in srun_lines[1][0]
    watchdog = 'scontrol show step "$SLURM_JOB_ID.0"'
    assert watchdog in two_nodes.stdout and watchdog not in one_node.stdout


def test_cluster_script_starts_two_nodes_and_stop_leaves_nothing(slurm_session):
    env = start_cluster(2)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c %T"], capture_output=True, text=True, env=env).stdout
    assert sorted(nodes.split("\n")[:-1]) == ["node1 1 idle", "node2 1 idle"]  # 1 of the 2 cores each
    # Two hosts: a step on each has its own host name, resolves both names, and resolves both
    # addresses back, also in the IPv4-mapped form c10d's dual-stack sockets report peers in.
    probe = ("import socket as s; print(s.gethostname(), s.gethostbyname('node1'), s.gethostbyname('node2'), "
             "s.gethostbyaddr('169.254.100.11')[0], s.getnameinfo(('::ffff:169.254.100.12', 0), s.NI_NAMEREQD)[0])")
    r = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "-l", sys.executable, "-c", probe],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    common = "169.254.100.11 169.254.100.12 node1 node2"
    assert sorted(r.stdout.splitlines()) == [f"0: node1 {common}", f"1: node2 {common}"]
    status = subprocess.run(["bash", str(DEV_CLUSTER), "status"], capture_output=True, text=True, env=env)
    assert status.returncode == 0 and "slurmd node2 running" in status.stdout

    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ours = [line.split()[0] for line in namespaces.splitlines() if line.split()[0].endswith(("-node1", "-node2"))]
    assert len(ours) == 2
    stop = subprocess.run(["bash", str(DEV_CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in left for ns in ours)
    links = subprocess.run(["ip", "-o", "-4", "addr", "show", "to", "169.254.100.0/24"], capture_output=True,
                           text=True).stdout
    assert links == ""  # the bridge, with the controller's address, is gone
    assert cluster_processes("slurmd", env["SLURM_CONF"]) == []


def test_launch_two_nodes_trains_one_job_across_two_hosts(two_nodes, reference, runs):
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["hosts"] == ["node1", "node2"]
    assert summary["ranks_in_sync"] is True and summary["epochs_run"] == 2
    # Each rank's address resolves back to its host's name (the nodes' hosts file has both ways).
    assert "hostname of the client socket cannot be retrieved" not in logs(runs, "reference")


def test_two_nodes_match_one_node_with_two_processes(reference, beton_dir, tmp_path):
    from trainer.launch import config_path, load_profiles  # the launcher's config for resnet9_tiny

    # The same recipe and global batch as `reference`, as two processes on this one host (torchrun).
    run_dir = tmp_path / "one-host"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "trainer", "--config", str(config_path("resnet9_tiny")), "--run-dir", str(run_dir),
                        "model.arch=resnet9_tiny", *load_profiles()["smoke"], f"data.dir={beton_dir}", *RUN],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["hosts"]) == 1
    assert_same_weights(run_dir, reference)


def test_killed_rank_ends_the_job_in_bounded_time_and_the_rerun_resumes(two_nodes, reference, beton_dir, runs):
    args = (f"data.dir={beton_dir}", *RUN)
    r = launch(runs, "killed", *args, env=two_nodes, wait=False)
    assert r.returncode == 0, r.stderr
    job, run_dir = job_id(runs, "killed"), runs / "killed/resnet9_tiny"
    survivor, victim = wait_for(lambda: rank_pids(job), 120, "a training process on node1 and node2")
    wait_for(lambda: epochs_done(run_dir) >= 1, 300, "epoch 1 and its checkpoint", every=0.02)
    os.kill(victim, signal.SIGKILL)  # early in epoch 2
    killed = time.monotonic()

    wait_for(lambda: not alive(survivor), TIMEOUT_S + SLACK_S, "the rank on node1 to exit")
    wait_for(lambda: job_ended(job, two_nodes), TIMEOUT_S + SLACK_S, "the job to end")
    took = time.monotonic() - killed
    assert job_state(job, two_nodes) == "FAILED", logs(runs, "killed")[-3000:]
    assert not (run_dir / "summary.json").exists(), "the kill came too late: the run had finished"
    assert epochs_done(run_dir) == 1
    print(f"job ended {took:.1f} s after the kill")

    again = launch(runs, "killed", *args, env=two_nodes)  # the same sweep: resubmits, which resumes
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming" in logs(runs, "killed")
    assert json.loads((run_dir / "summary.json").read_text())["hosts"] == ["node1", "node2"]
    assert_same_weights(run_dir, reference)


def test_cut_link_fails_both_ranks_in_bounded_time(two_nodes, beton_dir, runs):
    r = launch(runs, "cut", f"data.dir={beton_dir}", *RUN, "train.epochs=50", env=two_nodes, wait=False)
    assert r.returncode == 0, r.stderr
    job, run_dir = job_id(runs, "cut"), runs / "cut/resnet9_tiny"
    namespace = None
    try:
        ranks = wait_for(lambda: rank_pids(job), 120, "a training process on node1 and node2")
        wait_for(lambda: epochs_done(run_dir) >= 1, 300, "epoch 1")  # both ranks in the training loop
        namespace = subprocess.run(["ip", "netns", "identify", str(ranks[1])], capture_output=True,
                                   text=True).stdout.strip()
        assert namespace.endswith("-node2")
        # node2 vanishes from the network, as a host that lost power would: no connection is closed.
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
        cut = time.monotonic()
        wait_for(lambda: not any(alive(pid) for pid in ranks), TIMEOUT_S + SLACK_S, "both ranks to exit")
        took = time.monotonic() - cut
        # At least one collective waited the whole timeout: nothing told rank 0 its peer was gone.
        assert took >= TIMEOUT_S - 5, f"the ranks ended {took:.1f} s after the cut, before their timeout"
        log = logs(runs, "cut")
        assert f"train.dist_timeout_s={TIMEOUT_S}" in log, log[-3000:]  # the error names the bound
        print(f"both ranks exited {took:.1f} s after the cut")
    finally:
        if namespace:
            subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "up"], check=True)
        # srun on node1 still waits for the exit of node2's task, whose message was lost with the
        # link (slurmstepd does not send it again): SLURM would end this job when it declared
        # node2 dead (SlurmdTimeout, 5 minutes), or srun's --wait (slurm.STEP_WAIT_S) a minute
        # after rank 0 left (slurm.step_watchdog: once the link is back). The ranks are gone;
        # the job's shell is cancelled here.
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True)
        wait_for(lambda: job_ended(job, two_nodes), 60, "the cancelled job to end")
    assert not (run_dir / "summary.json").exists()
