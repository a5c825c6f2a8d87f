"""Every `python -m jaxllm.X` command: bad input is one `error:` line and exit status 2
(jaxllm/config/cli.py), never a traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.helpers.runs import ROOT

MISSING = "/nonexistent/jaxllm-test"

# (command, a bad input, what the error line says)
CASES = [
    ("jaxllm.main", [f"--workdir={MISSING}", "--config.stages.pretrain.step=3"],
     "did you mean 'stages.pretrain.steps'"),
    ("jaxllm.main", [], "--workdir"),
    ("jaxllm.main", [f"--workdir={MISSING}", "--bogus=1"], "bogus"),
    ("jaxllm.plan", ["--config=configs/nope.py"], "nope.py"),
    ("jaxllm.plan", ["--config=configs/tiny.py", "extra"], "unexpected arguments: extra"),
    ("jaxllm.compile", ["--config=configs/tiny.py", "--target=v9-8"], "v9-8"),
    ("jaxllm.convert", ["export", f"--workdir={MISSING}", f"--out={MISSING}-hf"], MISSING),
    ("jaxllm.convert", [], "command"),
    ("jaxllm.generate", [f"--workdir={MISSING}", "--prompt=x"], MISSING),
    ("jaxllm.data.prepare", [f"--input={MISSING}/*.txt", f"--out={MISSING}-out"], MISSING),
    ("jaxllm.checkpoint", ["average", f"--workdir={MISSING}", "--last=2", f"--out={MISSING}2"],
     MISSING),
    ("jaxllm.eval.niah", [f"--workdir={MISSING}"], MISSING),
    ("jaxllm.eval.long_ppl", [f"--hf={MISSING}"], MISSING),
    ("jaxllm.eval.report", [f"--workdir={MISSING}"], MISSING),
    ("jaxllm.eval.tasks.stdlib", ["--bogus"], "--bogus"),
]
if importlib.util.find_spec("lm_eval") is not None:
    CASES.append(("jaxllm.eval.harness", ["--model", "jaxllm", "--model_args",
                                          f"workdir={MISSING}", "--tasks", "stdlib_ppl"], MISSING))


def test_every_command_fails_bad_input_with_one_error_line_and_status_2(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, args, _ in CASES]  # side by side: most of each is importing
    wrong = []
    for (module, args, says), proc in zip(CASES, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if proc.returncode != 2 or len(errors) != 1 or says not in errors[0] or \
                "Traceback" in err:
            wrong.append(f"{module} {' '.join(args)}: exit {proc.returncode}\n{err[-1500:]}")
    assert not wrong, "\n\n".join(wrong)
