"""The documentation: README's set-up commands, every Python snippet of README.md and docs/usage.md
(each run in a fresh namespace, as a reader would paste it), and links that stay inside the repository.

A snippet opts out with a leading ``# not run`` comment, only where it needs files that do not exist
here (e.g. a CIFAR folder).
"""

import re
from pathlib import Path

import pytest

import sensprune as sp

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SNIPPET_FILES = (README, ROOT / "docs" / "usage.md")
DOC_FILES = (README, *sorted((ROOT / "docs").glob("*.md")))
# Written by another part of the project; a link to it may precede the file.
PENDING = {ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "convnets.md"}  # convnets: the study's page
MAX_README_LINES = 220


def _python_blocks(path):
    text = path.read_text()
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        yield text[: match.start()].count("\n") + 2, match.group(1)  # line of the first code line


BLOCKS = [(path, line, code) for path in SNIPPET_FILES for line, code in _python_blocks(path)]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", text)
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
        "python -m experiments.main --config=configs/default.py --workdir=runs/default",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
        "python -m pytest -q -n 2",
    ]
    # .ci/run runs the same steps in the same order (pip quietly, after upgrading pip; ruff and mypy before
    # the tests; --durations only adds a report).
    ci = [line.replace(" -q -r ", " -r ") for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if not line.lstrip().startswith("#")]
    steps = [next((i for i, line in enumerate(ci) if line.startswith(step)), None)
             for step in commands[1].split(" && ")]
    assert None not in steps and steps == sorted(steps), (steps, commands[1])
    assert ci[steps[-1]].startswith("python -m pytest -q -n 2") and any(line == "mypy" for line in ci[:steps[-1]])


def test_readme_is_short_and_consistent_with_the_default_config():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    from configs import default
    from experiments import spacing

    ratios = spacing.keep_ratios(default.get_config().experiments.spacing)
    methods = default.get_config().experiments.methods
    flat = " ".join(text.split())
    assert f"all {len(methods)} methods at {len(ratios)} keep ratios" in flat
    experiments_md = " ".join((ROOT / "docs" / "experiments.md").read_text().split())
    assert f"all {len(methods)} methods, {len(ratios)} keep ratios" in experiments_md


def test_snippets_were_found():
    assert sum(path == README for path, _, _ in BLOCKS) >= 2
    assert sum(path != README for path, _, _ in BLOCKS) >= 5


@pytest.mark.parametrize("path,line,code", BLOCKS, ids=[f"{p.name}:{n}" for p, n, _ in BLOCKS])
def test_snippet_runs(path, line, code):
    if code.lstrip().startswith("# not run"):
        pytest.skip("needs files that are not in the repository")
    assert "from sensprune." not in code and "import sensprune." not in code, "snippets use the public API (sp.*)"
    namespace = {"__name__": "__docs__"}
    exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)  # noqa: S102
    # What some snippets promise beyond running.
    if 'method="pfp", keep_ratio=0.3, key=' in code:
        assert abs(namespace["result"].keep_ratio - 0.3) < 0.02
    if 'sp.register_method("abs_sens"' in code:
        assert "abs_sens" in sp.available_methods()
        res = sp.prune(namespace["model"], namespace["variables"], namespace["x"], method="abs_sens",
                       keep_ratio=0.4)
        assert abs(res.keep_ratio - 0.4) <= 0.002


def test_links_and_paths_stay_inside_the_repository():
    for doc in DOC_FILES:
        text = doc.read_text()
        assert "../shared" not in text and "/work/" not in text, doc
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists() or resolved in PENDING, f"{doc.name}: broken link {target}"
