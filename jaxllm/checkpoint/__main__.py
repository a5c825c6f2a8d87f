"""`python -m jaxllm.checkpoint average ...` (checkpoint/average.py)."""

from jaxllm.checkpoint.average import main

main()
