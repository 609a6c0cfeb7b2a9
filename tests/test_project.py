from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text()
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    # The README's second command installs, then runs exactly the command CI runs.
    assert readme.split("```")[3].strip().endswith(test_command)


def test_public_api():
    from pcr_diffusers import SolveResult, newton_solve, pcr_solve, sequential_solve  # noqa: F401
