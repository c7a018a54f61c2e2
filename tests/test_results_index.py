"""bench/results/README.md indexes every results file, and its "cited by" column tells the truth:
each file or doc it names mentions the results file, and every results file is cited by something
(bench/results/ holds the tables a doc cites, not every run). A .jsonl counts as cited by the .md of
the same run beside it."""
import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INDEX = RESULTS / "README.md"
SIBLING = re.compile(r"^\d{4}-\d{2}-\d{2}-")
ROW = re.compile(r"^\| `(?P<name>[^`]+)`(?P<plus> \(\+ `\.jsonl`\))? \|")


@functools.lru_cache(maxsize=None)
def index_rows() -> dict:
    """{file name: [cited-by entries]}; a row "`X.md` (+ `.jsonl`)" indexes X.jsonl with X.md's entries.
    Parsed once for all the tests (read-only); a file with two rows raises."""
    rows = {}
    for line in INDEX.read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        if m["name"] in rows:
            raise AssertionError(f"{m['name']}: two rows in bench/results/README.md")
        cited = [c.strip() for c in line.rstrip().rstrip("|").rsplit("|", 1)[1].split(",") if c.strip()]
        rows[m["name"]] = cited
        if m["plus"]:
            rows[m["name"][:-3] + ".jsonl"] = [m["name"]]
    return rows


def results_files() -> list:
    try:
        out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        names = [Path(p).name for p in out]
    except (OSError, subprocess.CalledProcessError):
        names = [p.name for p in RESULTS.iterdir()]
    return sorted(n for n in names if n != "README.md")


def test_every_results_file_has_one_row_and_every_row_a_file():
    rows, files = index_rows(), results_files()
    assert files, "no results files found"
    assert sorted(set(files) - set(rows)) == [], "results files missing from bench/results/README.md"
    assert sorted(set(rows) - set(files)) == [], "index rows whose file is gone"


@pytest.mark.parametrize("name", results_files())
def test_cited_by_names_files_that_cite_it(name):
    cited = index_rows().get(name)
    assert cited, f"{name}: its row names nothing that cites it"
    for c in cited:
        path = RESULTS / c if SIBLING.match(c) else ROOT / c    # another results file, or a repo path
        assert path.is_file(), f"{name}: cited by {c}, which does not exist"
        if name.endswith(".jsonl") and c == name[:-6] + ".md":
            continue                                   # the same run's table
        assert name in path.read_text(errors="replace"), f"{name}: {c} does not mention it"
