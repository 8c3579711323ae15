"""The sweep launcher behind `python jobs/launch.py`: one SLURM job per architecture (x grid point x
seed), via submitit, or the same jobs on this machine with --local.

A sweep has an id (default: date, time and the code's short git hash) that names its folder,
runs/<sweep>/, with one run folder per job, submitit's logs (runs/<sweep>/submitit/) and sweep.json
(each job by name: its architecture, grid point, seed, and the SLURM job it was submitted as). The
id is also the W&B group. Re-running a sweep skips jobs that finished (summary.json) or are still
queued or running, and resubmits the others, which resume from their checkpoints.

Each job is one node (or --nodes K) with one task per GPU started by srun (on CPU-only clusters,
`tasks_per_node` tasks); ranks come from submitit's TorchDistributedEnvironment. The submitted
callable is Checkpointable: on USR2 (preemption or the time limit coming) the trainer saves a
checkpoint within about train.stop_check_s, then submitit requeues the job, which resumes.

The files, in the order a launch goes through them:
    command.py  the command line: main(argv), and run(), which ties the rest together
    cluster.py  the cluster settings (the --cluster YAML, -C, --nodes), a strict schema
    grid.py     seeds and grids: the sweep's jobs and their names
    plan.py     each job's recipe config and overrides, its data checked; which jobs to submit now
    job.py      what each job runs on its node (TrainJob)
    slurm.py    SLURM: is the controller there, the sbatch lines, the sweep as one job array
    local.py    --local: the jobs on this machine's GPUs, one slot each, the others queued
    state.py    what became of a submitted job: SLURM's state, or a local job's FINISHED/FAILED/RUNNING
    status.py   --status and --wait: each job's state, epoch and best accuracy; then the report
    retry.py    --retries: a watched job that failed is submitted again, each attempt in sweep.json
sweep.json has its one reader and writer in trainer/sweep_file.py (the report reads it too).

Without --local the jobs go to SLURM; a machine without sbatch is told so in one line. submitit
(and torch, for --local's GPUs) is imported only once the command line, the cluster settings and
every job's config have been checked.
"""

from trainer.launch.cluster import ClusterConfig
from trainer.launch.command import main
from trainer.launch.grid import expand_grid, grid_values, plan_jobs
from trainer.launch.local import LOCAL_GPUS_ENV, LocalRunner, SlotQueue, local_executor, local_gpus, local_slots
from trainer.launch.plan import CONFIGS, config_path, ensure_data, load_profiles
from trainer.launch.slurm import check_slurm
from trainer.launch.status import wait

# What other code and the tests take from the launcher by this name.
__all__ = ["CONFIGS", "LOCAL_GPUS_ENV", "ClusterConfig", "LocalRunner", "SlotQueue", "check_slurm", "config_path",
           "ensure_data", "expand_grid", "grid_values", "load_profiles", "local_executor", "local_gpus",
           "local_slots", "main", "plan_jobs", "wait"]
