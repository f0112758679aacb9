"""README's two set-up commands and CI agree (CI must install exactly as the README says).

Assets: README.md and .ci/run from the repository.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands():
    block = re.search(r"## Set-up: two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_setup_commands_that_ci_runs():
    main_job, tests = _setup_commands()
    install = "python3 -m venv .venv && .venv/bin/pip install -q -c constraints-cpu.txt -e \".[dev]\""
    assert main_job.startswith(install + " && .venv/bin/stagereason ")
    assert tests == install + " && .venv/bin/python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci and ".venv/bin/python -m pytest -q" in ci


def test_readme_lists_every_verb():
    from stagereason.cli import VERBS

    readme = (ROOT / "README.md").read_text()
    for verb in VERBS:
        assert f"| `{verb}` |" in readme
