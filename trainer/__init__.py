"""CIFAR-infinity: train and compare CNN architectures on CIFAR-10 (FFCV data, DDP, SLURM, W&B)."""


class UserError(Exception):
    """Bad input from the user (a config, a path, a data file): reported as one line, exit code 1.

    Command-line entry points catch this and print only the message, so a typo never shows up as
    a traceback; anything else is a bug and keeps its traceback.
    """
