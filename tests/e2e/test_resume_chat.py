"""A five-stage chat run (tests/helpers/chat_config.py: pretrain 0..3, long_context 4..5, anneal
6..7, sft 8..11, dpo 12..15), SIGKILLed in its sft stage and again in its dpo stage, resumed
each time, logs what the same run uninterrupted logs, bit for bit: the data positions of the
chat and pair sources, and the dpo stage's reference (its starting weights, kept in
<workdir>/references/dpo), come back with the checkpoint."""

import os
import subprocess

from tests.helpers.runs import (
    ROOT,
    by_step,
    command,
    env,
    kill_after_checkpoint,
    run,
    start,
    wait_for_line,
)

CHAT = ["--config=tests/helpers/chat_config.py"]
KEYS = ("loss", "grad_norm", "lr", "reward_margin", "chosen_logp", "rejected_logp",
        "reward_accuracy")


def test_kills_in_the_sft_and_dpo_stages_resume_bit_for_bit(tmp_path):
    # The uninterrupted run goes on beside the interrupted one: each compiles while the other
    # computes.
    with open(tmp_path / "uninterrupted.log", "w") as log:
        uninterrupted = subprocess.Popen(command(tmp_path / "a", args=CHAT), cwd=ROOT, env=env(),
                                         stdout=log, stderr=subprocess.STDOUT)
        workdir = tmp_path / "b"
        for step in (10, 14):  # sft's second step, dpo's second step: each a checkpoint
            proc = start(workdir, args=CHAT)
            wait_for_line(proc, f"step {step}:")
            kill_after_checkpoint(proc, str(workdir), step)
        result = run(workdir, args=CHAT)
        assert "resumed from step 14 (dpo)" in result.stdout
        assert os.path.exists(workdir / "references" / "dpo" / "model.json")
        assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "uninterrupted.log").read_text()
    resumed, expected = by_step(workdir), by_step(tmp_path / "a")
    assert sorted(resumed) == sorted(expected) == list(range(1, 17))
    for step, record in expected.items():
        for key in KEYS:
            assert resumed[step].get(key) == record.get(key), (step, key)  # bitwise: float32
