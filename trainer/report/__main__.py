"""``python -m trainer.report runs/<sweep>``: the same as ``python jobs/report.py runs/<sweep>``."""

from trainer.report import main

main()
