"""CI must run the README's set-up commands, unchanged, before anything else."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith(("python3 -m venv", ". .venv/bin/activate"))]


def test_ci_runs_the_readme_commands():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(readme) == 2
    assert ci[:2] == readme
