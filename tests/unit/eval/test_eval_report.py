"""python -m jaxllm.eval.report: task scores against training tokens, stage ends marked."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[eval]')")

from jaxllm.eval import report  # noqa: E402

STAGES = {"pretrain": {"steps": 4, "seq_len": 8, "batch_size": 2},
          "long_context": {"steps": 0, "seq_len": 64, "batch_size": 1},
          "anneal": {"steps": 2, "seq_len": 16, "batch_size": 1}}


def _run(tmp_path, records: list[dict]):
    (tmp_path / "config.json").write_text(json.dumps({"model": {}, "stages": STAGES}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                            + '{"step": 9, "eval/cut sh')  # a crash mid-line
    return tmp_path


def test_scores_against_tokens_with_stage_ends(tmp_path, capsys):
    run = _run(tmp_path, [
        {"step": 2, "stage": "pretrain", "loss": 3.0},
        {"step": 2, "stage": "pretrain", "eval/mc/acc": 0.25, "eval/ppl/bits_per_byte": 7.0},
        {"step": 4, "stage": "pretrain", "eval/mc/acc": 0.5, "eval/ppl/bits_per_byte": 6.0},
        {"step": 4, "stage": "pretrain", "eval/mc/acc": 0.75},  # resumed: logged again
        {"step": 6, "stage": "anneal", "eval/mc/acc": 1.0, "eval/ppl/bits_per_byte": 5.0}])
    stages = report.stage_tokens(json.loads((run / "config.json").read_text()))
    assert stages == [("pretrain", 0, 4, 16), ("anneal", 4, 6, 16)]  # long_context: 0 steps
    assert [report.tokens_at(s, stages) for s in (0, 2, 4, 5, 6, 9)] == [0, 32, 64, 80, 96, 96]

    fig = report.plot(report.read_scores(str(run)), stages, str(tmp_path / "t.png"))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [(ax.get_title(), ax.get_ylabel()) for ax in panels] == [
        ("mc", "acc"), ("ppl", "bits_per_byte")]
    x, y = panels[0].lines[0].get_data()
    assert list(x) == [32e-6, 64e-6, 96e-6] and list(y) == [0.25, 0.75, 1.0]
    ends = [line.get_xdata()[0] for line in panels[0].lines[1:]]
    assert ends == [64e-6, 96e-6]  # dashed lines at the ends of the stages that trained

    report.main(["--workdir", str(run)])
    assert (run / "eval" / "tasks.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "pretrain (step 4): mc/acc=0.75, ppl/bits_per_byte=6" in out
    assert "anneal (step 6): mc/acc=1, ppl/bits_per_byte=5" in out


def test_a_run_without_task_scores_is_one_line(tmp_path, capsys):
    run = _run(tmp_path, [{"step": 2, "stage": "pretrain", "loss": 3.0}])
    with pytest.raises(SystemExit) as e:
        report.main(["--workdir", str(run)])
    assert e.value.code == 2
    assert "has no task scores" in capsys.readouterr().err
