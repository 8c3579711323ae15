"""Write the sweep's report: the comparison with the seed's table, deployment figures, an ensemble, plots, W&B.

    python jobs/report.py runs/<sweep> [--no-deploy] [--ensemble a,b | --no-ensemble] [--wandb-mode MODE]

The logic lives in trainer/report/ (python -m trainer.report is the same command); --help lists the options.
"""

from trainer.report import main

if __name__ == "__main__":
    main()
