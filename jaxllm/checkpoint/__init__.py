"""Checkpoints: a training run's train state (state.py), what run directories and params
checkpoints hold (run_dir.py), and `python -m jaxllm.checkpoint average` (average.py)."""
