"""The pages: every shell example in README.md and docs/*.md runs, as a reader meets them (the README, then each
page in the order of the README's Documentation list), in ONE temporary copy of the repository: a page's examples
run on the files the pages before it wrote, never in a fresh folder of their own; the README stays a front door
(at most 12,000 bytes); every figure agrees with its results file.

Examples are found by Sybil (markdown fences and `<!-- skip: next "reason" -->` comments): ```bash and ```sh
blocks run as one script each; ```console blocks hold `$ command` lines, each followed by the output it shows,
which is compared with its stdout (doctest's ELLIPSIS: `...` matches anything; nothing shown, nothing compared).
A new page in docs/ is picked up as it is (after the listed ones). The folder starts from the state the README's
set-up leaves: its first command's `fmnist-onnx` steps, run once here, in a copy of the repository whose `.venv`
is this interpreter's. An example selected alone (-k) first runs the examples before it, on its page and the pages
before it: each example runs once per session, whichever test asks first.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sybil import Document, Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, SkipParser

REPO = Path(__file__).resolve().parents[1]


def reader_order() -> list[Path]:
    """README.md, then docs/ in the order of the README's Documentation list, then any page it does not list."""
    listed = re.findall(r"^- \[docs/([\w-]+\.md)\]", (REPO / "README.md").read_text().split("## Documentation")[-1],
                        re.M)
    pages = [REPO / "docs" / name for name in dict.fromkeys(listed) if (REPO / "docs" / name).is_file()]
    return [REPO / "README.md", *pages, *(p for p in sorted((REPO / "docs").glob("*.md")) if p not in pages)]


PAGES = reader_order()
README_LIMIT = 12_000
SETUP = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)[:2]  # the job, the tests
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "artifacts", "__pycache__", ".pytest_cache",
                                     ".ruff_cache", "*.egg-info", "build", "dist")


def run_shell(script: str, cwd: Path, stop_on_error: bool = True) -> subprocess.CompletedProcess:
    """One example as bash runs it (a script stops at its first failing line), the set-up's .venv active."""
    venv = Path(sys.prefix)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", *(["-e"] if stop_on_error else []), "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def failure(command: str, proc: subprocess.CompletedProcess, why: str) -> str:
    return (f"{why}\n$ {command}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
            f"--- stderr\n{proc.stderr[-3000:]}")


def console_steps(block: str) -> list[tuple[str, str]]:
    """`$ command` lines (a trailing backslash continues one) with the output shown under each."""
    steps: list[tuple[str, str]] = []
    lines = block.splitlines()
    while lines:
        line = lines.pop(0)
        if not line.startswith("$ "):
            steps[-1] = (steps[-1][0], steps[-1][1] + line + "\n")
            continue
        command = line[2:]
        while command.endswith("\\") and lines:
            command += "\n" + lines.pop(0)
        steps.append((command, ""))
    return steps


def evaluate_shell(example: Example) -> str | None:
    """Sybil's evaluator for bash/sh/console blocks: a message where an example fails, None where it passes."""
    where: Path = example.namespace["workspace"]
    if example.parsed.strip() == SETUP[0]:
        return None  # the set-up's job: its fmnist-onnx steps made the workspace (main_job), the rest installs
    if example.parsed.strip() == SETUP[1]:
        raise pytest.skip.Exception("the set-up's test command: installs packages and runs this suite (.ci/run)")
    language = example.region.lexemes["arguments"]
    steps = console_steps(example.parsed) if language == "console" else [(example.parsed, "")]
    checker = doctest.OutputChecker()
    for command, shown in steps:
        proc = run_shell(command, where, stop_on_error=language != "console")  # `cmd; echo "exit $?"` works
        if proc.returncode != 0:
            return failure(command, proc, "the example failed")
        if shown and not checker.check_output(shown, proc.stdout, doctest.ELLIPSIS):
            return failure(command, proc, f"its output is not what the page shows:\n{shown}")
    return None


SYBIL = Sybil(parsers=[CodeBlockParser(lang, evaluate_shell) for lang in ("bash", "sh", "console")] + [SkipParser()])


class PageRun:
    """One page's examples, evaluated in order in its own copy of the workspace, each at most once."""

    def __init__(self, page: Path):
        self.document: Document = SYBIL.parse(page)
        self.examples = list(self.document)
        self.outcomes: list[str] = []  # "passed", "skipped", "failed", by example
        self.failed_at = 0  # the line of the first example that failed

    def run_through(self, index: int, workspace: Path) -> None:
        self.document.namespace["workspace"] = workspace
        while len(self.outcomes) <= index:
            example = self.examples[len(self.outcomes)]
            if "failed" in self.outcomes:
                self.outcomes.append("failed")
                pytest.fail(f"an earlier example on this page failed (line {self.failed_at})")
            try:
                example.evaluate()
            except BaseException as e:
                skipped = isinstance(e, pytest.skip.Exception) or type(e).__name__ == "SkipTest"
                self.outcomes.append("skipped" if skipped else "failed")
                self.failed_at = self.failed_at or (0 if skipped else example.line)
                raise
            self.outcomes.append("passed")


RUNS = {page: PageRun(page) for page in PAGES}
CASES = [pytest.param(page, i, id=f"{page.relative_to(REPO)}:{ex.line}")  # shell blocks; skip comments run between
         for page, run in RUNS.items() for i, ex in enumerate(run.examples) if ex.region.evaluator is evaluate_shell]
# Steps of the set-up not run here, and why (the pages use nothing they write).
LEFT_OUT = {"bench": "the default bench measures for about 40 s (int8 quantized on the fly, PyTorch beside "
                     "onnxruntime, the plot): tests/test_bench.py runs the same command with --plot and --json"}


@pytest.fixture(scope="session")
def main_job(tmp_path_factory, trained_dir) -> Path:
    """A copy of the repository after the README set-up's `fmnist-onnx` steps, in the order written there.

    Its `train` is not run: the suite's trained model (trained_dir: 2 epochs, about 88% test accuracy) is copied
    into artifacts/ instead, which saves a 10-epoch training (11 s on a quiet 2-core machine, minutes on a busy
    one) that another test already pays for. `bench` is left out (LEFT_OUT says why). Every other step runs as
    written."""
    root = tmp_path_factory.mktemp("docs") / "repo"
    shutil.copytree(REPO, root, ignore=COPY_IGNORE, symlinks=True)
    (root / ".venv").symlink_to(sys.prefix)
    (root / "artifacts").mkdir()
    for step in (s.strip() for s in SETUP[0].split("&&")):
        if not step.startswith(".venv/bin/fmnist-onnx"):
            continue  # apt-get, venv, pip: the set-up this suite already runs in
        if step.split()[1] == "train":
            for name in ("model.pth", "metrics.json", "training_curves.png"):
                shutil.copy2(trained_dir / name, root / "artifacts" / name)
            continue
        if step.split()[1] in LEFT_OUT:
            continue
        proc = run_shell(step, root)
        assert proc.returncode == 0, failure(step, proc, "the README set-up's step failed")
    return root


@pytest.fixture(scope="session")
def ray_tmpdir():
    """Ray's session files in a short temporary folder (its socket paths must stay under 107 bytes), then gone."""
    short = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = short
    yield
    os.environ.pop("RAY_TMPDIR") if old is None else os.environ.__setitem__("RAY_TMPDIR", old)
    shutil.rmtree(short, ignore_errors=True)


def run_pages_before(page: Path, workspace: Path) -> None:
    """Every example of the pages before ``page``, where not run yet (an example selected alone with -k): the
    folder as a reader has it. Their failures are their own tests' to report."""
    for before in PAGES[:PAGES.index(page)]:
        run = RUNS[before]
        for i, _ in enumerate(run.examples):
            try:
                run.run_through(i, workspace)
            except BaseException as e:  # noqa: BLE001 - pytest's fail and skip are BaseExceptions
                if isinstance(e, KeyboardInterrupt):
                    raise


@pytest.mark.slow
@pytest.mark.parametrize(("page", "index"), CASES)
def test_docs_example(page, index, main_job, ray_tmpdir):
    """Each shell example of each page, in reader order, all in main_job's folder: it exits 0 and prints what the
    page shows."""
    run_pages_before(page, main_job)
    RUNS[page].run_through(index, main_job)


def test_docs_readme_is_a_front_door():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail to docs/ (limit {README_LIMIT:,})"


def test_docs_every_skip_says_why():
    for page in PAGES:
        for line in re.findall(r"<!--\s*skip:.*?-->", page.read_text()):
            assert re.fullmatch(r'<!--\s*skip: (next|start) ".+"\s*-->', line), f"{page.name}: {line} (say why)"


def test_docs_every_figure_agrees_with_its_results():
    proc = subprocess.run([sys.executable, REPO / "benchmarks" / "render_docs.py", "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_docs_every_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link {missing}"
