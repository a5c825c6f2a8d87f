"""tiny.py:smoke's model through the five stages of a chat recipe, a few steps each, for tests:
pretrain → long_context → anneal → sft (the shipped conversations) → dpo (the shipped pairs);
8 rows a step, every step logged, a checkpoint every 2 steps (steps 0..3 pretrain, 4..5
long_context, 6..7 anneal, 8..11 sft, 12..15 dpo)."""

from jaxllm.configs import tiny


def get_config(arg=None):
    c = tiny.get_config("smoke")
    for name, steps in (("pretrain", 4), ("long_context", 2), ("anneal", 2)):
        c.stages[name].update(steps=steps, batch_size=8)
    tiny.add_chat_stages(c, sft=(4, 256, 8, 1e6, 2e-3, 2e-3, 0, "constant"),
                         dpo=(4, 256, 8, 1e6, 1e-3, 1e-3, 0, "constant"))
    c.log_every, c.eval_every, c.checkpoint.every_steps = 1, 1000, 2
    return c
