"""The README's commands, its settings table and CI stay in step with the code."""

from __future__ import annotations

from config.model_config import SETTINGS
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_run_and_test_commands() -> None:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[0] for line in block] == ["./scripts/run.sh", "./scripts/test.sh"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1].strip() == "./scripts/test.sh"


def test_every_setting_is_documented() -> None:
    for setting in SETTINGS:
        assert f"`{setting.env}`" in README, setting.env
