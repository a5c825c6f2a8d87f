"""Training: the pure train step (step.py), the chunked loss (loss.py), the optimizer (optim.py),
one stage's loop (loop.py), the stages in order (stages.py), metrics and profiling."""
