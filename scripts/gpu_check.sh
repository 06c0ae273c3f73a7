#!/usr/bin/env bash
# One prepared run on a machine with a CUDA GPU (the device tool): the test suite, then the demo,
# the BatchNorm CNN and the dropout transformer trained and replayed on the GPU, each compared with
# the same run on the CPU. Prints the figures a closing note needs; writes them to $OUT if set.
#   bash scripts/gpu_check.sh            # needs a python whose torch sees CUDA (no downloads there)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/plgk-gpu-check}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: $PY has no CUDA torch"; exit 2; }
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || echo "gpu_check: editable install failed (see pip.log); using the checkout on PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
timeout 420 "$PY" -m pytest -q -x -p no:cacheprovider --deselect tests/test_bench.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
for name in demo cnn_batchnorm transformer_text; do
  # one CPU run replayed on both devices (same checkpoints: the audits must agree), and one run
  # trained on the GPU (its dropout masks come from the CUDA generator: rng/cuda) replayed there
  for device in cpu cuda; do
    sed "s/^\[train\]/[train]\ndevice = \"$device\"/" "configs/$name.toml" > "$OUT/$name-$device.toml"
    "$PY" -m plgk_cli train --config "$OUT/$name-$device.toml" --out "$OUT/$name-$device" --quiet \
      >"$OUT/$name-$device.train.txt" 2>&1
  done
  for pair in cpu:cpu cpu:cuda cuda:cuda; do
    run=${pair%%:*}; device=${pair##*:}
    /usr/bin/time -f "%e s" "$PY" -m plgk_cli replay --ckpts "$OUT/$name-$run" --audit-set 'test[:32]' \
      --device "$device" --out "$OUT/$name-$run-on-$device.h5" --quiet >"$OUT/$name-$run-on-$device.txt" 2>&1
    echo "$name, trained on $run, replayed on $device: $(tr '\n' ' ' < "$OUT/$name-$run-on-$device.txt")"
  done
  "$PY" - "$OUT/$name-cpu-on-cpu.h5" "$OUT/$name-cpu-on-cuda.h5" <<'PYEOF'
import sys
import numpy as np
from plgk_cli.store import InfluenceFile
with InfluenceFile(sys.argv[1]) as a, InfluenceFile(sys.argv[2]) as b:
    x, y = a.influence("loss").astype(float), b.influence("loss").astype(float)
    print(f"  same checkpoints, cpu vs cuda replay: influence relative difference "
          f"{np.linalg.norm(x - y) / np.linalg.norm(x):.2e}; cuda MRE {b.metrics('loss')['mre']:.3e} "
          f"LC {b.metrics('loss')['lc']:.6f} upd. err {b.metrics('loss')['max_update_error']:.1e}")
PYEOF
done 2>&1 | tee "$OUT/runs.txt"
