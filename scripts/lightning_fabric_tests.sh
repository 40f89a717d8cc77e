#!/usr/bin/env bash
# Lightning's own Fabric tests that run a DDP strategy on CPU, run twice from the same Lightning tag: once as
# they are ("ddp") and once with the strategy swapped to firecaffe, then compared test by test. Not part of
# the CI suite (about 10 minutes of 2 cores); the result is recorded in docs/lightning_tests.md.
#
#   LIGHTNING_REPO=/path/to/pytorch-lightning scripts/lightning_fabric_tests.sh
#
# LIGHTNING_REPO: a clone (or bare git dir) of github.com/Lightning-AI/pytorch-lightning. LIGHTNING_REF: the
# tag to take the tests from (default: the installed lightning's version). PYTHON: the interpreter with
# lightning, torch and pytest-timeout. OUT: where the copies, logs and results go. PREPARE_ONLY=1: make the
# copies and stop.
#
# The copies:
#   ddp/        tests/tests_fabric and pyproject.toml (its pytest settings) exactly as tagged.
#   firecaffe/  the same, with `import lightning_firecaffe` atop tests_fabric/conftest.py, and in
#               NAME_SWAP files the strategy names "ddp", "ddp_spawn", "ddp_fork" (double-quoted, as the
#               tests write them) replaced by "firecaffe", "firecaffe_spawn", "firecaffe_fork"; in
#               CLASS_SWAP files, which build `DDPStrategy(...)` themselves, the class imported under that
#               name is lightning_firecaffe.fabric.FireCaffeStrategy.
# Each copy runs twice, as Lightning's CI does: the selected files in one pytest run (standalone tests
# skipped), then with PL_RUN_STANDALONE_TESTS=1 every standalone test of those files in a pytest process of
# its own (as Lightning-AI/utilities' scripts/run_standalone_tests.sh does, but one at a time). Every
# pytest run takes /tmp/firecaffe-cpu.lock so that no other multi-process run shares the cores. Prints the
# counts of both copies and every test whose outcome differs; exits 1 if any does.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
: "${LIGHTNING_REPO:?set LIGHTNING_REPO to a clone of Lightning-AI/pytorch-lightning}"
LIGHTNING_REF="${LIGHTNING_REF:-$("$PYTHON" -c 'import lightning; print(lightning.__version__)')}"
OUT="${OUT:-/tmp/lightning-fabric-tests}"
TIMEOUT="${TIMEOUT:-180}"  # per test (Lightning's CI uses 60 s on faster machines)
LOCK="${LOCK:-/tmp/firecaffe-cpu.lock}"

NAME_SWAP=(
    test_fabric.py
    test_connector.py
    strategies/test_ddp_integration.py
    strategies/launchers/test_multiprocessing_integration.py
    utilities/test_spike.py
    plugins/precision/test_amp_integration.py
)
CLASS_SWAP=(
    strategies/test_ddp.py
    utilities/test_distributed.py
    plugins/collectives/test_torch_collective.py
)
FILES=("${NAME_SWAP[@]}" "${CLASS_SWAP[@]}")
# Lightning's --strict-markers meets `@pytest.mark.flaky` of pytest-rerunfailures (not a dependency here):
# the marker is declared, so those tests run once, without reruns, in both copies alike.
MARKERS=(-o "markers=cloud: Run the cloud tests for example
flaky: pytest-rerunfailures is not installed: run once")

git_dir="$LIGHTNING_REPO"
[ -d "$LIGHTNING_REPO/.git" ] && git_dir="$LIGHTNING_REPO/.git"
git --git-dir="$git_dir" rev-parse --verify -q "$LIGHTNING_REF^{commit}" >/dev/null || {
    echo "tag $LIGHTNING_REF not in $LIGHTNING_REPO: set LIGHTNING_REF to the nearest release tag" >&2
    exit 2
}
rm -rf "$OUT" && mkdir -p "$OUT/ddp" "$OUT/results"
git --git-dir="$git_dir" archive "$LIGHTNING_REF" pyproject.toml tests/tests_fabric | tar -x -C "$OUT/ddp"
cp -a "$OUT/ddp" "$OUT/firecaffe"
fc="$OUT/firecaffe/tests/tests_fabric"
sed -i '1i import lightning_firecaffe  # noqa: F401  registers the firecaffe names with Fabric' "$fc/conftest.py"
for f in "${NAME_SWAP[@]}"; do
    sed -i -E 's/"ddp(_spawn|_fork)?"/"firecaffe\1"/g' "$fc/$f"
done
for f in "${CLASS_SWAP[@]}"; do
    sed -i -E 's/^from lightning\.fabric\.strategies(\.ddp)? import DDPStrategy$/from lightning_firecaffe.fabric import FireCaffeStrategy as DDPStrategy/; s/^from lightning\.fabric\.strategies import DDPStrategy, (.*)$/from lightning.fabric.strategies import \1\nfrom lightning_firecaffe.fabric import FireCaffeStrategy as DDPStrategy/' "$fc/$f"
    grep -q "FireCaffeStrategy as DDPStrategy" "$fc/$f" || { echo "class swap failed in $f" >&2; exit 1; }
done
echo "Lightning $LIGHTNING_REF tests in $OUT; diff of the swap:"
diff -ru "$OUT/ddp/tests" "$OUT/firecaffe/tests" | grep -E '^[-+][^-+]' | sort | uniq -c | sort -rn | head -30 || true
[ -z "${PREPARE_ONLY:-}" ] || exit 0

export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for copy in ddp firecaffe; do
    res="$OUT/results/$copy"
    mkdir -p "$res/standalone"
    cd "$OUT/$copy/tests/tests_fabric"  # where Lightning's CI runs them
    echo "== $copy: pytest ${#FILES[@]} files"
    PL_RUN_STANDALONE_TESTS=0 timeout 3600 flock "$LOCK" "$PYTHON" -m pytest -v -p no:cacheprovider "${MARKERS[@]}" \
        --timeout="$TIMEOUT" --junitxml="$res/main.xml" "${FILES[@]}" >"$res/main.log" 2>&1 || true
    tail -n 1 "$res/main.log"
    cd "$OUT/$copy"  # node ids are relative to the rootdir (the copy's pyproject.toml)
    (cd tests/tests_fabric && PL_RUN_STANDALONE_TESTS=1 "$PYTHON" -m pytest -q --collect-only -p no:cacheprovider \
        "${MARKERS[@]}" "${FILES[@]}" 2>/dev/null) | grep '::' >"$res/standalone.txt" || true
    echo "== $copy: $(wc -l <"$res/standalone.txt") standalone tests, one process each"
    i=0
    while IFS= read -r test; do
        i=$((i + 1))
        status=0
        PL_RUN_STANDALONE_TESTS=1 timeout 1200 flock "$LOCK" "$PYTHON" -m pytest -v -s -rA -p no:cacheprovider \
            "${MARKERS[@]}" --timeout="$TIMEOUT" "$test" </dev/null >"$res/standalone/$i.log" 2>&1 || status=$?
        printf '%s\t%s\t%s\n' "$test" "$status" "$res/standalone/$i.log" >>"$res/standalone.tsv"
    done <"$res/standalone.txt"
done
"$PYTHON" "$HERE/scripts/compare_pytest_runs.py" "$OUT/results/ddp" "$OUT/results/firecaffe"
