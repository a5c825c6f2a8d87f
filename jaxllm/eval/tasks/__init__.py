"""lm-eval tasks that ship with jaxllm (YAML + JSONL), found by name through harness.TASKS_DIR."""
