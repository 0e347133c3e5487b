"""Every ```python block of README.md runs as written (in order, in a temporary folder), then every
```bash block that starts with ``peft-alps`` (the CLI examples), in the same folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
CLI_BLOCKS = re.findall(r"```bash\n(peft-alps .*?)```", README.read_text(), flags=re.S)


@pytest.mark.real_model
@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 4
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md python block {i}", "exec"), {"__name__": f"readme_{i}"})
    assert (tmp_path / "my-heads" / "adapter_model.safetensors").exists()
    assert CLI_BLOCKS
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in CLI_BLOCKS:
        subprocess.run(["bash", "-euo", "pipefail", "-c", block], check=True, env=env)
    for out in ("heads", "math-heads", "topic-cli-heads"):
        assert {p.name for p in (tmp_path / out).iterdir()} == {"scores.json", "heads.json", "heatmap.png"}


def test_readme_commands_match_ci():
    text = README.read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert commands[:2] == ["bash .ci/setup && .venv/bin/python -m peft_alps.demo",
                            "bash .ci/setup && .venv/bin/python -m pytest"]
    assert commands[1] in (README.parent / ".ci" / "run").read_text()
