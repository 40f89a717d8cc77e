"""Compare two runs of the same tests test by test (scripts/lightning_fabric_tests.sh writes them).

Each run directory holds main.xml (pytest's JUnit report) and standalone.tsv (node id, exit status, log
of one pytest process per standalone test; their outcome is read from the exit status and the log's
`-rA` summary, since a launched rank re-runs the same command and would overwrite a JUnit file). Test
ids are compared with "firecaffe" read as "ddp", so that `test[ddp_spawn]` meets `test[firecaffe_spawn]`.

    python scripts/compare_pytest_runs.py OUT/results/ddp OUT/results/firecaffe
"""

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "skipped")


def junit_outcomes(path: Path) -> dict[str, str]:
    """Test key -> outcome for every testcase of a JUnit report (xfail counts as skipped, as pytest's does)."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = case.get("classname", "").replace(".", "/") + "::" + case.get("name", "")
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            outcomes[key] = "failed"
        elif "error" in kinds:
            outcomes[key] = "error"
        elif "skipped" in kinds:
            outcomes[key] = "skipped"
        else:
            outcomes[key] = "passed"
    return outcomes


def node_key(node_id: str) -> str:
    """`a/b.py::Class::test[p]` -> `a/b/Class::test[p]`, the key junit_outcomes builds from a testcase."""
    *scope, name = node_id.split("::")
    return "/".join([scope[0].removesuffix(".py"), *scope[1:]]) + "::" + name


def standalone_outcome(status: int, log: str) -> str:
    """One standalone test's outcome from its process's exit status and its `-rA` summary."""
    summary = log.rpartition("short test summary info")[2]
    if status == 0:
        return "passed" if "PASSED" in summary else "skipped" if "SKIPPED" in summary else "error"
    return "error" if "ERROR" in summary and "FAILED" not in summary else "failed"


def run_outcomes(run: Path) -> dict[str, str]:
    """Every test of one run, keyed with firecaffe read as ddp."""
    outcomes = junit_outcomes(run / "main.xml") if (run / "main.xml").exists() else {}
    tsv = run / "standalone.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        node_id, status, log = line.split("\t")
        outcomes[node_key(node_id)] = standalone_outcome(int(status), Path(log).read_text(errors="replace"))
    return {key.replace("firecaffe", "ddp"): outcome for key, outcome in outcomes.items()}


def compare(base: dict[str, str], other: dict[str, str]) -> list[tuple[str, str, str]]:
    """(test, base outcome, other outcome) for every test whose outcome differs or that only one run has."""
    return [
        (key, base.get(key, "absent"), other.get(key, "absent"))
        for key in sorted(base.keys() | other.keys())
        if base.get(key) != other.get(key)
    ]


def counts(outcomes: dict[str, str]) -> str:
    tally = Counter(outcomes.values())
    return ", ".join(f"{tally[o]} {o}" for o in OUTCOMES) + f" ({len(outcomes)} tests)"


def main(base_dir: str, other_dir: str) -> int:
    base, other = run_outcomes(Path(base_dir)), run_outcomes(Path(other_dir))
    print(f"{Path(base_dir).name:>10}: {counts(base)}")
    print(f"{Path(other_dir).name:>10}: {counts(other)}")
    differences = compare(base, other)
    for key, was, now in differences:
        print(f"  {was:>8} -> {now:<8} {key}")
    print(f"{len(differences)} tests differ")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
