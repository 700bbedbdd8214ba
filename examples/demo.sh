#!/usr/bin/env bash
# The end-to-end demo on the phantom: synth -> prepare -> slice (-> train -> impute -> evaluate).
set -euo pipefail
PY=${PY:-.venv/bin/python}
D=${DEMO_DIR:-demo_out}
UB="$PY -m unibrain_cli"
rm -rf "$D"
$UB synth "$D/phantom" --cases 30 --seed 0 --resolution 1
$UB prepare "$D/phantom/radgenome" --images "$D/phantom/images" --out "$D/prepared" --workers 2
$UB slice "$D/prepared" --out "$D/slices" --size 64 --per-case 3
echo "demo: phantom, prepared cases and slices are in $D/"
