#!/usr/bin/env bash
# Mutation testing of shm_model/, workers/ and tablerag/store.py with mutmut (pinned in the
# "mutation" extra), module by module, then the score and the surviving mutants.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
Usage: scripts/mutation.sh [options] [MODULE ...]

Mutation testing with mutmut: every function of a module is copied into mutants/ once per
change (an operator flipped, a constant moved by one, a string altered, an argument dropped...)
and the tests that cover it run against each copy. A mutant no test notices "survives".
Prints the time of each module, the score per module and for shm_model/+workers/, and every
mutant that was not detected (`mutmut show NAME` prints its diff).

MODULE is a dotted module or package (shm_model.protocol, shm_model.host, workers.worker,
tablerag.store), run one after the other, each timed; without one, one run over every module
of shm_model/, workers/ and tablerag/store.py (timed as a whole; mutants with the fastest tests
run first, so a run cut short has scored those). Results are kept in mutants/ between runs (delete it, or
--fresh, to start over).

What "the tests that cover it" means: mutmut runs the in-process tests once (tests/unit/, set in
pyproject.toml [tool.mutmut]) and records which test called which
function; each mutant then runs only those tests, fastest first, until one fails
(tests/unit/conftest.py orders them). Code that runs only in a subprocess (the
supervisor's serving loop and a worker's main loop, started by tests/conftest.py's hosts) is
covered by no in-process test, so its mutants count as "no tests", which the score counts as
survivors; the subprocess suites are not run per mutant (minutes each).

Options:
  --children N     mutmut's parallel test processes (default: $MUTATION_CHILDREN, else the number of
                   cores + 1: a mutant whose tests hang waits for its timeout without using a core);
                   runs under nice -n 19
  --fresh          delete mutants/ first (the stats of which test covers what are collected again)
  --report         print the score and survivors of the last runs without running anything
  --min-score P    exit 1 when the score of shm_model/+workers/ is under P percent (default 0)
  -h, --help       this text

Equivalent mutants (no test could tell them from the code) are listed with a reason in
scripts/mutation-survivors.md and leave the score's denominator.
Needs: pip install -e ".[mutation]" (mutmut). On a quiet 2-core machine the full run takes about
the time given in the README's testing section.
EOF
}

cores="$(nproc 2>/dev/null || echo 1)"
children="${MUTATION_CHILDREN:-$((cores + 1))}"
fresh=0
report_only=0
min_score=0
modules=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --children) children="${2:?--children needs a number}"; shift 2 ;;
    --fresh) fresh=1; shift ;;
    --report) report_only=1; shift ;;
    --min-score) min_score="${2:?--min-score needs a percentage}"; shift 2 ;;
    -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    *) modules+=("$1"); shift ;;
  esac
done
case "$children" in ''|*[!0-9]*|0) echo "--children must be an integer >= 1, got '$children'" >&2; exit 2 ;; esac

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
report() { "$python" scripts/mutation_report.py --min-score "$min_score"; }
if [ "$report_only" -eq 1 ]; then
  report
  exit $?
fi
mutmut="$(dirname "$python")/mutmut"
[ -x "$mutmut" ] || { echo "mutmut is not installed: $python -m pip install -e '.[mutation]'" >&2; exit 2; }

if [ ${#modules[@]} -eq 0 ]; then
  modules=(ALL)
fi
[ "$fresh" -eq 1 ] && rm -rf mutants

export HF_HUB_OFFLINE=1
# Each mutant starts a pytest session: loading every installed plugin (schemathesis, playwright...)
# took several seconds of it. The unit tests need only pytest-timeout, named in pyproject.toml.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
mkdir -p mutants/logs
total=0
echo "load before: $(uptime)"
for module in "${modules[@]}"; do
  if [ "$module" = ALL ]; then
    patterns=()  # every mutant
  elif [ "${module%.__init__}" != "$module" ]; then
    module="${module%.__init__}"
    patterns=("$module.x*")  # a package's __init__ alone
  elif [ -f "$(echo "$module" | tr . /)/__init__.py" ]; then
    patterns=("$module.x*" "$module.*.x*")  # a package: its __init__ and every module in it
  else
    patterns=("$module.x*")
  fi
  log="mutants/logs/$module.log"
  start=$(date +%s)
  status=0
  nice -n 19 "$mutmut" run --max-children "$children" ${patterns[@]+"${patterns[@]}"} >"$log" 2>&1 || status=$?
  seconds=$(( $(date +%s) - start ))
  total=$(( total + seconds ))
  if [ "$status" -ne 0 ]; then
    if grep -q "but nothing matches" "$log"; then
      printf '%-28s %5ss  (no mutants)\n' "$module" "$seconds"
      continue
    fi
    echo "mutmut failed on $module (exit $status); the end of $log:" >&2
    tail -n 20 "$log" | tr '\r' '\n' | tail -n 20 >&2
    exit 1
  fi
  printf '%-28s %5ss\n' "$module" "$seconds"
done
echo "total: ${total}s; load after: $(uptime)"
echo
report
