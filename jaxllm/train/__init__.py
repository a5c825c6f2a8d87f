"""Training: the pure train step (step.py) and the multi-stage pipeline (pipeline.py)."""
