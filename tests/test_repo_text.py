"""The repository's text is reference for its users: no document, comment or message speaks of how the work was done.

Every text file git knows about (tracked, or new and not ignored: README, docs/**/*.md, *.py, *.sh, the Dockerfiles,
pyproject.toml, constraints.txt, ...) is searched line by line for work-log language: links outside the repository
(`../shared/...`), work sessions and rounds ("third session", "this round"), issue and pull-request numbers
("issue 8", "#12"), and the developers' machines ("this machine", "our machines", "measured here"). A hit fails the
test, naming file:line, what kind of text it is and the line.

The patterns are narrow on purpose, so ordinary English passes: "any number of rounds", `--rounds N` and "every
round's speed-up" (the benchmark's alternating rounds), a boto3 or HTTP session, a pytest session fixture, colour
codes such as "#555555". The last two tests pin both sides. This file spells the patterns and their examples, so
it is the one file not searched.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve()
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".jinja"}
TEXT_NAMES = {".gitignore", ".dockerignore", "run"}  # `run`: .ci/run
NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache", ".whl", "build", "dist", "runs",
              "out", "bench-results"}

_NOT_A_TRIP = r"(?!-|\s+trips?\b)"  # "that round trip", "round-robin" are not rounds of work
WORK_LOG = {
    "a link outside the repository": r"\.\./shared\b|\bshared/notes\b",
    "a work session": r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|this|next|last|previous"
                      r"|earlier|later)\s+sessions?\b|\bsession\s+\d+\b",
    "a round of work": rf"\b(?:this|that|earlier|previous|later)\s+rounds?\b{_NOT_A_TRIP}"
                       r"|\brounds?\s+of\s+(?:work|changes|review)\b",
    "an issue or pull-request number": r"\b(?:issues?|PRs?|pull\s+requests?)\s+#?\d+",
    "an issue reference": r"(?:^|[\s(\[,;])#\d+\b",
    "the developers' machines": r"\bthis\s+machine\b|\bthis\s+project's\s+machines?\b|\bour\s+(?:own\s+)?machines?\b",
    "'here' meaning the developers' machines": r"\b(?:measured|re-?checked|unverified)\s+here\b",
}
PATTERNS = {kind: re.compile(pattern, re.IGNORECASE) for kind, pattern in WORK_LOG.items()}


def is_text_file(relative: str) -> bool:
    path = Path(relative)
    return path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES or path.name.startswith("Dockerfile")


def generated(relative: Path) -> bool:
    """A virtual environment, cache or build output (what .gitignore keeps out of git)."""
    return any(part in NOT_SOURCE or part.endswith(".egg-info") for part in relative.parts)


def repo_files() -> list[str]:
    """Tracked files plus new ones git does not ignore; without git, every file outside the build/venv folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not generated(p.relative_to(REPO))]
    return [name for name in listed if name]


def text_files() -> list[Path]:
    paths = {REPO / name for name in repo_files() if is_text_file(name)}
    return sorted(p for p in paths if p.is_file() and p.resolve() != SELF)


def work_log_hits(line: str) -> list[str]:
    """The kinds of work-log text in one line, and the words that matched."""
    return [f"{kind} ({m.group(0).strip()!r})" for kind, rx in PATTERNS.items() if (m := rx.search(line))]


def test_no_work_log_text_in_the_repository():
    files = text_files()
    assert any(p.name == "README.md" for p in files) and any(p.suffix == ".py" for p in files), "no files searched"
    problems = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for hit in work_log_hits(line):
                problems.append(f"{path.relative_to(REPO)}:{number}: {hit}: {line.strip()[:100]}")
    assert not problems, "work-log text in the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize("line", [
    "What it fixes relative to the sample code (../shared/notes/reference-sample.md): the fine-tune",
    "bnb's CPU kernel repacks weights in blocks of 64 (shared/notes/stack.md, gotcha 1).",
    "### Latest: a burst runs as one batch (third session, 2026-11-26 16:20-16:35)",
    "`--stream` (since the fourth session) sends the headers first",
    "Second session (2026-11-26 14:26-14:40, load average 0.0-1.2)",
    "Also checked this round: Python's garbage collector.",
    "Before this round's changes it was 3.1x.",
    "| earlier rounds (P) | 3-8 | 16.9-37.0 |",
    "Targets checked (issue 8): batched >= 4x sequential",
    "fixed upstream (issues #1218/#1448)",
    "bitsandbytes >= 0.46 compiles (fullgraph since PR #1616)",
    "see #12 for the discussion",
    'reason="needs CUDA; none on this machine"',
    "The CPU build of torch that lies on this project's machines",
    "details of our own machines leak into the docs",
    "The quick run took 130 s, measured here.",
    "(measured elsewhere and re-checked here)",
    "- **Unverified here.** The GPU images could not be built",
])
def test_patterns_catch_work_log_text(line):
    assert work_log_hits(line), line


@pytest.mark.parametrize("line", [
    "- Turns alternate `human` / `gpt`. Any number of rounds is fine.",
    "python -m bench.run_cpu [--rounds N] [--out DIR]",
    "the comparison is the median per level (every round's speed-up is listed)",
    '"Sequential server" + (", last round" if args.rounds > 1 else "")',
    "for messages in conversations * 2:  # the second round hits the per-shape cache",
    "latency_ms = round(1000 * (time.monotonic() - started), 1)",
    "two round trips of the full-size array; that round trip is avoided",
    '"""boto3 sessions and clients, configured in one place."""',
    "The clients one command needs, created on first use from the same session.",
    '@pytest.fixture(scope="session")',
    "The tiny artifact loaded once per session (fp32 on CPU).",
    "reuse the HTTP session for keep-alive",
    '"purple": "#54278f", "brown": "#5c3310", "gray": "#555555"},',
    "# 1. read the config",
    "## Dynamic batching",
    "docker run --gpus all -p 8080:8080 IMAGE serve    # on a GPU machine",
    "what this does about it, all on the 4-bit path",
    "uvicorn listens here: 0.0.0.0:8080 unless SAGEMAKER_BIND_TO_PORT says otherwise",
])
def test_patterns_pass_ordinary_english(line):
    assert not work_log_hits(line), work_log_hits(line)
