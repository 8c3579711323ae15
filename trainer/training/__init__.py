"""Training one architecture: `python -m trainer` (run.py) drives the Trainer (trainer.py).

    progress.py    what the run has done so far: the one record checkpointed and restored whole
    checkpoint.py  the run folder's checkpoints: atomic saves, last/prev fallback, the full state
    stopping.py    should the run stop now, and why (epochs, patience, time budget, signals)
    evaluate.py    test loss and accuracy, with flip TTA (also the report's ensemble)
    optim.py       parameter groups and the learning-rate schedule
    summary.py     summary.json: results and provenance
"""
