"""Speed benchmarks, `python -m trainer.bench`: the loaders (loaders), training steps (steps) and time
to accuracy (accuracy), each ratio measured in the same run; deploy times a trained network for
serving."""
