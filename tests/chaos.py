"""The chaos soak (issue #22): a sweep on the 2-node dev cluster survives faults injected at random.

    .venv/bin/python tests/chaos.py --faults 20 --seed 1 [--jobs 3] [--epochs 40] [--time-limit 3000]

Needs root (the dev cluster, a tmpfs, network namespaces) and the default dev cluster
(slurm/devcluster/cluster.sh: SLURM_ROOT and SLURM_PORT_BASE as the environment says); it starts
that cluster with 2 nodes, and stops it at the end if it was down before.

1. The reference: `jobs/launch.py --nodes 2 --seeds JOBS --wait` of resnet9_tiny (the smoke
   profile, 512 training images, EPOCHS epochs, deterministic: no flip or translation, one thread a
   rank, as tests/test_multinode.py's RUN; offline W&B) trained without faults, into WORK/runs/reference.
2. The chaos sweep: the same command (plus `--retries`) into a sweep folder on a small tmpfs this
   script mounts (and unmounts at the end, also on failure); the data stays outside it. While it
   runs, the punisher injects FAULTS faults, one at a time: it waits until a job's two ranks run,
   then a delay drawn from random.Random(SEED), then one fault of a shuffled, balanced schedule:
     rank kill    SIGKILL of one rank (either node): the other rank loses its peer, the job fails
                  (FAILED) and the launcher's --retries submits it again; it resumes from its last
                  checkpoint.
     slurmd kill  SIGKILL of one node's slurmd, started again 1-10 s later (cluster.sh slurmd
                  NODE), as a supervisor would: the job steps run on (each has its slurmstepd)
                  and the new slurmd takes them over.
     link cut     a node's eth0 down for 2-45 s, then up again (a switch port that flaps). Shorter
                  than train.dist_timeout_s (30 s) the ranks wait and go on; longer, both ranks
                  fail with the timeout's error line and the launcher retries. What really
                  happens then: a rank that exits while its link is down has its exit message
                  lost (slurmstepd does not send it again, though its step completion reaches
                  slurmctld later), and srun waited for it until the job's time limit, even with
                  --kill-on-bad-exit. The launcher now gives a job of several tasks srun
                  --wait=60, which ends the step a minute after its first task left while
                  slurmctld still knows the step, and a batch-script watchdog that kills srun
                  once slurmctld has seen the step end (trainer/launch/slurm.py): the job fails
                  and is retried.
     pre-emption  `scancel --signal=USR2 JOB`, the signal SLURM's own pre-emption (and the time
                  limit's --signal=USR2@) sends: the ranks agree on a step, save a checkpoint, and
                  rank 0 requeues the job (submitit); it comes back as the same job id.
     full disk    the tmpfs filled with a ballast file, freed 2-10 s later: whatever writes then
                  (a checkpoint, metrics.jsonl, W&B, sweep.json, submitit's pickles) fails, and
                  the system must neither lose nor corrupt a file it wrote before.
3. The checks, then ONE line on stdout (the progress goes to stderr):
     jobs completed           each job wrote summary.json and the launcher exited 0;
     equal to the reference   each job's final weights (checkpoints/last.pt) equal the reference
                              job's of the same seed bit for bit;
     files lost (must be 0)   each of these counts one: sweep.json unreadable; a job's summary.json
                              or config.yaml missing or unreadable; its metrics.jsonl with an
                              unreadable line, not exactly epochs 1..EPOCHS once each, or an epoch's
                              figures (losses, accuracies, learning rate) other than the reference's;
                              a checkpoint (last.pt, best.pt, prev.pt) that does not load;
     W&B runs                 the W&B run ids a job's offline-run-*-<id> folders and wandb.json name:
                              one per job, never one per attempt or per rank.
   The exit status is 0 only if every fault was injected, every job completed with the reference's
   weights, nothing was lost, each job has one W&B run, and all within --time-limit.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # as a script: cluster_tools and conftest beside it

from cluster_tools import DETERMINISTIC, alive, different_tensors, epochs_done, rank_pid  # noqa: E402

DEV_CLUSTER = REPO / "slurm/devcluster/cluster.sh"
KINDS = ("rank kill", "slurmd kill", "link cut", "pre-emption", "full disk")
NODES = ("node1", "node2")
ARCH = "resnet9_tiny"
# train.dist_timeout_s: how long a rank waits for a silent peer. test_multinode's 10 s failed a
# healthy reference run here while other test suites loaded the 2 cores tenfold.
DIST_TIMEOUT_S = 30


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] chaos: {message}", file=sys.stderr, flush=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- the cluster ---------------------------------------------------------------------------------


def cluster(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEV_CLUSTER), *args], capture_output=True, text=True, env=env, timeout=600)


def namespace(node: str) -> str:
    return f"slurm{os.environ.get('SLURM_PORT_BASE', '6817')}-{node}"  # cluster.sh's NS_PREFIX + node


def slurmd_pid(node: str, env: dict) -> int | None:
    found = re.search(rf"^slurmd {node}\s+running \(pid (\d+)", cluster("status", env=env).stdout, re.M)
    return int(found.group(1)) if found else None


def slurm_root(env: dict) -> Path:
    return Path(cluster("status", env=env).stdout.split("\n", 1)[0].removeprefix("SLURM_ROOT="))


def running_job(sweep: str, env: dict) -> tuple[str, str] | None:
    """The sweep's job that runs now (its jobs run one at a time: each takes both nodes): its id
    (SLURM_JOB_ID), and its id as sweep.json names it (an array's task: <array id>_<index>)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-n", f"cifar-{sweep}", "-o", "%A %i"],
                         capture_output=True, text=True, env=env).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else None


# ---- the punisher --------------------------------------------------------------------------------


class Punisher(threading.Thread):
    """Injects `faults` faults into the sweep's running jobs, one at a time (see the module's doc)."""

    def __init__(self, faults: int, rng: random.Random, env: dict, sweep: str, disk: Path, max_delay_s: float):
        super().__init__(name="punisher", daemon=True)
        self.rng, self.env, self.sweep, self.disk, self.max_delay_s = rng, env, sweep, disk, max_delay_s
        # Rounds of the five kinds, each round shuffled: balanced, in an order of the seed's.
        self.schedule = [kind for _ in range(0, faults, len(KINDS)) for kind in rng.sample(KINDS, len(KINDS))][:faults]
        self.done: Counter[str] = Counter()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.ballast = disk / "ballast"
        self.epochs_at_fault: dict[str, int] = {}  # run name -> its epochs done when it last took a fault

    def run(self) -> None:
        try:
            for kind in self.schedule:
                while not self.stop.is_set() and not self._inject(kind):
                    pass
        except BaseException as e:  # told by the main thread
            self.error = e

    def _victim(self) -> tuple[str, list[int], str] | None:
        """The running job's id, its two ranks and its run's name, once they run, and once its run
        has finished an epoch since the last fault it took (a job new to the punisher need not): two failures with
        the same error line and no progress between are what a deterministic failure looks like,
        and the launcher rightly stops retrying that job (retry.py)."""
        found = running_job(self.sweep, self.env)
        if found is None:
            return None
        job, array_id = found
        pids = [rank_pid(job, node) for node in NODES]
        if not all(pids):
            return None
        name = self._run_name(array_id)
        if name is None or epochs_done(self.disk / self.sweep / name) <= self.epochs_at_fault.get(name, -1):
            return None
        return job, pids, name

    def _run_name(self, job_id: str) -> str | None:
        try:
            jobs = json.loads((self.disk / self.sweep / "sweep.json").read_text())["jobs"]
        except (OSError, ValueError, KeyError):  # being rewritten, or the disk full
            return None
        return next((name for name, info in jobs.items() if info.get("job_id") == job_id), None)

    def _inject(self, kind: str) -> bool:
        """Waits for a job to hit (see _victim), then a random delay, then injects `kind`; whether it did."""
        while (found := self._victim()) is None:
            if self.stop.wait(0.5):
                return False
        if self.stop.wait(self.rng.uniform(0, self.max_delay_s)):
            return False
        job, pids, name = found
        if not all(alive(pid) for pid in pids):
            return False  # the job ended (or failed) meanwhile: wait for the next one
        node = self.rng.choice(NODES)
        self.epochs_at_fault[name] = epochs_done(self.disk / self.sweep / name)
        if kind == "rank kill":
            pid = pids[NODES.index(node)]
            say(f"fault {sum(self.done.values()) + 1}: SIGKILL of job {job}'s rank on {node} (pid {pid})")
            os.kill(pid, signal.SIGKILL)
        elif kind == "slurmd kill":
            pid, down_s = slurmd_pid(node, self.env), self.rng.uniform(1, 10)
            if pid is None:
                raise RuntimeError(f"no slurmd runs on {node}")
            say(f"fault {sum(self.done.values()) + 1}: SIGKILL of {node}'s slurmd (pid {pid}) for {down_s:.1f} s "
                f"(job {job})")
            os.kill(pid, signal.SIGKILL)
            time.sleep(down_s)
            self.restart_slurmd(node)
        elif kind == "link cut":
            cut_s = self.rng.uniform(2, 45)
            say(f"fault {sum(self.done.values()) + 1}: {node}'s link cut for {cut_s:.1f} s (job {job})")
            subprocess.run(["ip", "-n", namespace(node), "link", "set", "eth0", "down"], check=True)
            time.sleep(cut_s)
            subprocess.run(["ip", "-n", namespace(node), "link", "set", "eth0", "up"], check=True)
        elif kind == "pre-emption":
            say(f"fault {sum(self.done.values()) + 1}: pre-emption of job {job} (scancel --signal=USR2)")
            subprocess.run(["scancel", "--signal=USR2", job], env=self.env, check=True, capture_output=True)
        else:
            full_s = self.rng.uniform(2, 10)
            filled = self.fill_disk()
            say(f"fault {sum(self.done.values()) + 1}: the run folders' disk full ({filled >> 20} MiB of ballast) "
                f"for {full_s:.1f} s (job {job})")
            time.sleep(full_s)
            self.ballast.unlink()
        self.done[kind] += 1
        return True

    def fill_disk(self) -> int:
        """Writes the ballast until the tmpfs has no byte left; its size."""
        written = 0
        with open(self.ballast, "wb", buffering=0) as f:
            for size in (1 << 20, 1 << 12):  # then the last few pages
                chunk = bytes(size)
                try:
                    while True:
                        written += f.write(chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
        return written

    def restart_slurmd(self, node: str) -> None:
        r = cluster("slurmd", node, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"cluster.sh slurmd {node}: {r.stderr.strip()[-500:]}")

    def heal(self) -> None:
        """Undoes whatever the last fault left (it may have been cut short): links up, slurmds back,
        the ballast gone."""
        for node in NODES:
            subprocess.run(["ip", "-n", namespace(node), "link", "set", "eth0", "up"], capture_output=True)
            if slurmd_pid(node, self.env) is None:
                self.restart_slurmd(node)
        self.ballast.unlink(missing_ok=True)


# ---- the runs ------------------------------------------------------------------------------------


def launch_command(runs: Path, sweep: str, data: Path, jobs: int, epochs: int, retries: int) -> list[str]:
    return [sys.executable, str(REPO / "jobs/launch.py"), "--arch", ARCH, "--profile", "smoke", "--nodes", "2",
            "--cluster", str(REPO / "slurm/multinode.yaml"), "-C", "cpus_per_task=1", "--sweep", sweep,
            "--runs", str(runs), "--seeds", str(jobs), "--retries", str(retries), "--wait", f"data.dir={data}",
            "data.train_subset=512", f"train.epochs={epochs}", *DETERMINISTIC,
            f"train.dist_timeout_s={DIST_TIMEOUT_S}", "logging.mode=offline"]


def run_names(sweep_dir: Path) -> list[str]:
    return [run["name"] for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]]


# metrics.jsonl's figures of how long and how much memory: the only ones an interrupted run may differ in.
TIMINGS = {"elapsed_s", "epoch_s", "images_per_s", "compile_s", "peak_mem_mb"}


def losses(run_dir: Path, reference: Path, epochs: int) -> list[str]:
    """What of the run folder is lost or damaged (see the module's doc), one line each."""
    import torch

    from trainer.run_files import read_metrics

    lost = []
    for name in ("summary.json", "config.yaml"):
        try:
            text = (run_dir / name).read_text()
            if name.endswith(".json"):
                json.loads(text)
            elif not text.strip():
                raise ValueError("empty")
        except (OSError, ValueError) as e:
            lost.append(f"{run_dir / name}: {type(e).__name__}: {e}")
    try:
        rows, expected = read_metrics(run_dir), read_metrics(reference)
        done = [row.get("epoch") for row in rows]
        if done != list(range(1, epochs + 1)):
            lost.append(f"{run_dir}/metrics.jsonl: epochs {done}, not 1..{epochs} once each")
        else:
            figures = [[{k: v for k, v in row.items() if k not in TIMINGS} for row in r] for r in (rows, expected)]
            differ = [row["epoch"] for row, ref in zip(*figures) if row != ref]
            if differ:
                lost.append(f"{run_dir}/metrics.jsonl: epochs {differ} differ from the reference's")
    except (OSError, ValueError) as e:
        lost.append(f"{run_dir}/metrics.jsonl: {e}")
    for name in ("last.pt", "best.pt", "prev.pt"):
        path = run_dir / "checkpoints" / name
        if name == "prev.pt" and not path.exists():
            continue  # kept only once a second save replaced last.pt
        try:
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # a checkpoint that does not load, whatever the reason
            lost.append(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return lost


def wandb_ids(run_dir: Path) -> set[str]:
    """The W&B run ids the run folder names: its offline-run-<time>-<id> folders and wandb.json."""
    ids = {p.name.rsplit("-", 1)[1] for p in run_dir.glob("wandb/offline-run-*")}
    try:
        ids.add(json.loads((run_dir / "wandb.json").read_text())["id"])
    except (OSError, ValueError, KeyError):
        pass
    return ids


def make_data(work: Path) -> Path:
    from conftest import write_synthetic_cifar10
    from trainer.data.cifar10 import prepare

    data = work / "data"
    if not (data / "train.beton").exists():
        prepare(data, write_synthetic_cifar10(work / "synthetic/cifar-10-batches-py"))
    return data


def run_sweep(command: list[str], log: Path, env: dict, deadline: float) -> int | None:
    """Runs the launcher to its end, its output into `log`; its exit status, None past the deadline."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def cancel_jobs(sweep: str, env: dict) -> None:
    """Cancels the sweep's jobs and waits (a minute at most) until none is left."""
    subprocess.run(["scancel", "-n", f"cifar-{sweep}"], env=env, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = subprocess.run(["squeue", "-h", "-n", f"cifar-{sweep}", "-o", "%A"], capture_output=True, text=True,
                              env=env).stdout.split()
        if not left:
            return
        time.sleep(0.5)


# ---- the soak ------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, env: dict, work: Path, data: Path, started: float) -> tuple[str, bool]:
    """The reference, the chaos sweep and the checks; the line to print and whether all held."""
    deadline = started + args.time_limit
    reference = work / "runs"
    shutil.rmtree(reference / "reference", ignore_errors=True)
    say(f"training the reference: {args.jobs} job(s) of {args.epochs} epochs, no faults ({reference}/reference)")
    code = run_sweep(launch_command(reference, "reference", data, args.jobs, args.epochs, 0), work / "reference.log",
                     env, deadline)
    if code != 0:
        raise RuntimeError(f"the reference sweep failed (exit {code}); its output: {work / 'reference.log'}")
    used = sum(p.stat().st_size for p in (reference / "reference").rglob("*") if p.is_file())
    size_mb = max(64, 3 * used >> 20)  # room for the runs, their previous checkpoints and W&B files

    # Under the dev cluster's shared mount point: a mount anywhere else stays out of the nodes' sight.
    disk = slurm_root(env) / "mnt" / f"chaos-{os.getpid()}"
    disk.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "chaos-runs", str(disk)], check=True)
    punisher = Punisher(args.faults, random.Random(args.seed), env, "chaos", disk, args.max_delay)
    try:
        say(f"the chaos sweep on a {size_mb} MiB tmpfs ({disk}/chaos), {args.faults} faults, seed {args.seed}")
        punisher.start()
        code = run_sweep(launch_command(disk, "chaos", data, args.jobs, args.epochs, args.retries),
                         work / "chaos.log", env, deadline)
        punisher.stop.set()
        punisher.join()
        if punisher.error is not None:
            raise punisher.error
        sweep = disk / "chaos"
        names = run_names(reference / "reference")
        lost = []
        try:
            run_names(sweep)
        except (OSError, ValueError) as e:
            lost.append(f"{sweep}/sweep.json: {e}")
        completed = [n for n in names if (sweep / n / "summary.json").is_file()]
        equal = [n for n in completed if not different_tensors(sweep / n, reference / "reference" / n)]
        for n in names:
            lost += losses(sweep / n, reference / "reference" / n, args.epochs)
        ids = {n: wandb_ids(sweep / n) for n in names}
        for problem in lost:
            say(f"lost: {problem}")
        for n in sorted(set(names) - set(equal)):
            say(f"{n}: {'not completed' if n not in completed else 'weights differ from the reference'}")
        say(f"the launcher exited {code}; its output: {work / 'chaos.log'}")
        if code is None:
            say(f"time limit of {args.time_limit:g} s exceeded")
        injected = sum(punisher.done.values())
        kinds = ", ".join(plural(punisher.done[k], k) for k in KINDS)
        runs = sum(len(v) for v in ids.values())
        took = f"{time.monotonic() - started:.0f} s" + (", time limit exceeded" if code is None else "")
        count = f"{injected}" if injected == args.faults else f"{injected} of {args.faults}"  # short: the sweep ended first
        line = (f"chaos: {count} faults injected ({kinds}), {len(completed)}/{len(names)} jobs completed, "
                f"{len(equal)}/{len(names)} with weights equal to the reference bit for bit, "
                f"{plural(len(lost), 'file')} lost, {plural(runs, 'W&B run')} for {plural(len(names), 'job')} "
                f"(seed {args.seed}, {took})")
        held = (code == 0 and injected == args.faults and len(equal) == len(names) and not lost
                and all(len(v) == 1 for v in ids.values()))
        return line, held
    finally:
        punisher.stop.set()
        punisher.join(timeout=60)
        cancel_jobs("chaos", env)
        punisher.heal()
        if disk.is_mount():
            if (disk / "chaos").is_dir():  # its records (not its weights) outside the tmpfs, for whoever reads the result
                shutil.rmtree(work / "chaos-sweep", ignore_errors=True)
                shutil.copytree(disk / "chaos", work / "chaos-sweep", ignore=shutil.ignore_patterns("*.pt"))
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(disk)], check=True)  # a process still in it: detached now
        disk.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="the punisher's random seed (default 1)")
    parser.add_argument("--jobs", type=int, default=3, help="jobs of the sweep: --seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of each job (default 40; the sweep must outlast "
                        "the faults: each took 3.5-5 epochs of it here)")
    parser.add_argument("--retries", type=int, default=30, help="the launcher's --retries (default 30)")
    parser.add_argument("--max-delay", type=float, default=10.0,
                        help="a fault comes up to this many seconds after its job is ready for one (default 10)")
    parser.add_argument("--time-limit", type=float, default=3000.0, help="fail past this many seconds (default 3000)")
    parser.add_argument("--data", type=Path, help="a folder of .beton files (default: a synthetic CIFAR-10 in WORK)")
    parser.add_argument("--work", type=Path, help="where the reference, the logs and a copy of the chaos sweep's "
                        "records go (default: a new folder under /tmp)")
    args = parser.parse_args(argv)
    if args.faults < 0 or args.jobs < 1 or args.epochs < 1:
        parser.error("--faults must be 0 or more, --jobs and --epochs 1 or more")
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    was_up = cluster("status", env=env).returncode == 0
    try:
        from conftest import start_cluster

        env = start_cluster(2)
        data = args.data or make_data(work)
        line, held = soak(args, env, work, data, started)
    finally:
        if not was_up:
            cluster("stop", env=env)
    print(line, flush=True)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
