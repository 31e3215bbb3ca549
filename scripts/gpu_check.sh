#!/usr/bin/env bash
# The CUDA check, <= 8 minutes on one H100: the suite's `cuda` tests, `saescope bench --json` on CUDA, and a
# Gemma-2-2B-shaped random precompute (65,536 latents, 1M tokens) against the bare forward; one JSON of results.
#   scripts/gpu_check.sh [OUT.json]     (default test-artifacts/gpu_check.json; PYTHON=... to pick the interpreter)
# Needs the project installed with a CUDA build of torch and the test extras (make setup TORCH_INDEX=...cu128).
# Each step has its own time limit; a step that fails or runs out is recorded as such and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-test-artifacts/gpu_check.json}
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))" >&2
    exit 2
fi

step() {  # step NAME SECONDS COMMAND...: stdout to $WORK/NAME.out, stderr to $WORK/NAME.err, status to $WORK/NAME.rc
    local name=$1 limit=$2
    shift 2
    echo "gpu_check: $name (limit ${limit}s)" >&2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    echo $? >"$WORK/$name.rc"
    echo $((SECONDS - t0)) >"$WORK/$name.seconds"
    tail -n 3 "$WORK/$name.err" >&2
}

step tests 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs --junitxml="$WORK/tests.xml" tests/engine
step bench 140 "$PY" -m engine.cli bench --json --no-queries
step shaped 220 "$PY" -m engine.tools.bench_shaped --tokens 1048576 --d-sae 65536

"$PY" - "$WORK" "$OUT" <<'PY'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch

work, out = Path(sys.argv[1]), Path(sys.argv[2])

def step(name):
    rc = int((work / f"{name}.rc").read_text())
    res = {"rc": rc, "seconds": int((work / f"{name}.seconds").read_text()), "timed_out": rc in (124, 137)}
    lines = (work / f"{name}.out").read_text().strip().splitlines()
    try:
        res["result"] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        res["stdout_tail"] = "\n".join(lines[-20:])
    if rc:
        res["stderr_tail"] = (work / f"{name}.err").read_text()[-3000:]
    return res

result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
          "python": platform.python_version(), "steps": {name: step(name) for name in ("tests", "bench", "shaped")}}
xml = work / "tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    result["steps"]["tests"]["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["steps"]["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                          if c.find("failure") is not None or c.find("error") is not None]
shaped = result["steps"]["shaped"].get("result")
if shaped:
    result["shaped_summary"] = {k: shaped[k] for k in ("tokens", "d_sae", "precompute_tokens_per_s", "forward_tokens_per_s",
                                                      "precompute_over_forward", "main_pass_over_forward", "gpu_peak_mb")}
out.write_text(json.dumps(result, indent=2))
print(json.dumps({"gpu": result["gpu"], **{k: v["rc"] for k, v in result["steps"].items()},
                  "shaped": result.get("shaped_summary")}, indent=2))
sys.exit(1 if any(v["rc"] for v in result["steps"].values()) else 0)
PY
