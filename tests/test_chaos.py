"""The chaos soak's short version (tests/chaos.py, issue #22): a one-job sweep on the 2-node dev
cluster takes three faults of the seeded schedule (seed 1: a slurmd's SIGKILL and restart, a
rank's SIGKILL, a full disk under the run folder) and still ends with the uninterrupted
reference's weights, nothing lost and one W&B run. About 5 minutes on a 2-core machine (the
reference, then the sweep with its retries; each attempt starts Python, torch and W&B anew). The
long version (20 faults and more, every kind) is run by hand: results/chaos/."""

import pytest

import chaos


@pytest.mark.slow
def test_a_sweep_survives_three_random_faults_with_the_reference_weights(slurm_session, beton_dir, tmp_path, capsys):
    code = chaos.main(["--faults", "3", "--seed", "1", "--jobs", "1", "--epochs", "10", "--max-delay", "5",
                       "--time-limit", "600", "--data", str(beton_dir), "--work", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0, line
    assert line.startswith("chaos: 3 faults injected (1 rank kill, 1 slurmd kill, 0 link cuts, 0 pre-emptions, "
                           "1 full disk), 1/1 jobs completed, 1/1 with weights equal to the reference bit for bit, "
                           "0 files lost, 1 W&B run for 1 job (seed 1, "), line
