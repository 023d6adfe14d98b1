"""The README's code examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", text)
    assert len(commands) == 2
    assert "experiments.main --config=configs/default.py" in commands[0]
    test_command = commands[1].split("&& ")[-1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci


def test_readme_examples_run(capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert abs(result.keep_ratio - 0.3) < 0.02
    import sensprune as sp

    assert "abs_sens" in sp.available_methods()
    res = sp.prune(namespace["model"], namespace["variables"], namespace["points"], method="abs_sens",
                   keep_ratio=0.4)
    assert abs(res.keep_ratio - 0.4) <= 0.002
