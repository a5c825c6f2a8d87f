"""Helpers that several test modules share, one module per part: runs (the checkout, smoke
configs, `python -m jaxllm.main` runs and their metrics, XLA flags), train, model, data,
corpus, hf; and chat_config, a config file for the five-stage chat runs. Test modules import
from here, never from one another; tests/conftest.py sets up."""
