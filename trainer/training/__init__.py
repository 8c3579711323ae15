"""Training one architecture: `python -m trainer` (run.py) drives the Trainer (trainer.py).

    progress.py    what the run has done so far: the one record checkpointed and restored whole
    checkpoint.py  the run folder's checkpoints (Checkpointer): atomic saves, last/prev fallback, the full state
    run_folder.py  the run folder's lock: one trainer at a time
    stopping.py    should the run stop now, and why (epochs, patience, budget plan, signals)
    budget.py      train.budget_s: the plan of steps fitted to a wall-time budget (BudgetController)
    collectives.py every collective the trainer makes, with the strict device check for tests
    evaluate.py    test loss and accuracy, with flip TTA (also the report's ensemble)
    optim.py       parameter groups and the learning-rate schedule
    summary.py     summary.json: results and provenance
"""
