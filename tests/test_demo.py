"""The README's main job, shortened: every stage of the offline demo (synth -> tiny base -> untrained eval -> train
-> serve -> ask -> eval with the blank-image control) through the real entry points, with a few charts and steps."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "demo", "--quick", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for stage in ("data", "base", "untrained", "train", "serve", "ask", "eval", "verdict"):
        assert f"=== {stage}" in output, stage
    report = json.loads((work / "eval" / "eval.json").read_text())
    assert list(report["runs"]) == ["untrained", "fine-tuned", "fine-tuned (blank image)"]
    assert report["failed"] == 0 and report["questions"] == 8
    assert "| **overall** |" in output and "fine-tuned (blank image)" in output
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "training_config.json"):
        assert (work / "model" / name).is_file(), name
    assert json.loads((work / "model" / "training_config.json").read_text())["max_steps"] == 3
    demo = json.loads((work / "demo_report.json").read_text())
    assert set(demo["seconds"]) >= {"data", "base", "untrained", "train", "serve", "eval", "total"}
    assert demo["checks"] and all(isinstance(c["ok"], bool) for c in demo["checks"])


def test_help_describes_the_demo_in_a_whole_sentence(capsys):
    from demo.pipeline import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "-> serve -> ask through the client -> evaluation table" in out
