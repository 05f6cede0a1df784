#!/bin/bash
# The next GPU session's checks for issue 7, as one device call each (run from the repo root):
#   bash docs/bench/gpu_session.sh E   (~450 s) depth 8: max-autotune-no-cudagraphs vs default
#       (more than a 15-minute loan leaves: at depth 4 it was still autotuning after 164 s)
#   bash docs/bench/gpu_session.sh F   (~560 s, ran in the second H100 loan) bench.py
#       --checkpoint on XL, train.py's loop with three saves, eager at micro-batch 64 (the
#       snapshot's cost does not depend on compiling, which takes 3 minutes), then depth 8
#       compiled: default with --profile, CUDA graphs, coordinate descent
#   bash docs/bench/gpu_session.sh G   (~150 s) depth 8 with --trace: the timeline of two steps
#       with the host's Python frames, to see what the host does in the device's idle gaps
#       at the compiled model's edges (second H100 loan: 7 ms of 75 per step)
# The GPU machine has torch but no open_clip or pytest and no internet: put their wheels in
# .whl/ first (pip download open_clip_torch ftfy wcwidth -d .whl --no-deps --python-version
# 3.12 --only-binary :all:, and pytest's into .whl/pytest), and carry .whl with the call.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/info.txt
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" >> $OUT/info.txt
python3 -c "import open_clip" 2>/dev/null || pip install -q --no-deps --no-index .whl/*.whl > /dev/null 2>&1
python3 -c "import pytest" 2>/dev/null || pip install -q --no-deps --no-index .whl/pytest/*.whl > /dev/null 2>&1
date -u >> $OUT/info.txt; cat $OUT/info.txt
echo "== CUDA tests"; timeout 120 python3 -m pytest -q -x test_all.py -k "cuda or snapshot" 2>&1 | tail -3
# a dry run on a CPU first catches a broken command before it costs device time:
#   mkdir -p /tmp/out; OUT=/tmp/out PRESET=MicroDiT_CPU_2 \
#   XL="--preset MicroDiT_Tiny_2 --phase 1 --batch-size 2" D8='--model {"depth":2,"patch_mixer_depth":1}' \
#   MB=1 TRAIN_EXTRA='--model {"depth":2,"patch_mixer_depth":1}' bash docs/bench/gpu_session.sh F
#   (the fake data is 256px latents with 1024-wide captions: Tiny's shapes, at 2 blocks)
PRESET=${PRESET:-MicroDiT_XL_2}
XL=${XL:-"--preset MicroDiT_XL_2 --phase 1 --batch-size 256"}
D8=${D8:-"--model {\"depth\":8,\"patch_mixer_depth\":2}"}
if [ "$1" = E ]; then
  echo "== depth 8 max-autotune $SECONDS"; timeout 400 python3 bench.py $XL $D8 --masks 0.75 --compile on --compile-mode max-autotune-no-cudagraphs --rounds 8 --warmup 3 --skip sample data --json $OUT/d8_ma.json > $OUT/d8_ma.txt 2>&1; echo rc $? at $SECONDS; grep "^train" $OUT/d8_ma.txt
  echo "== depth 8 default again $SECONDS"; timeout 150 python3 bench.py $XL $D8 --masks 0.75 --compile on --rounds 8 --warmup 3 --skip sample data > $OUT/d8_default2.txt 2>&1; grep "^train" $OUT/d8_default2.txt
fi
if [ "$1" = F ]; then
  echo "== checkpoint snapshot $SECONDS"; timeout 120 python3 bench.py --preset $PRESET --checkpoint --rounds 3 --skip train sample data --json $OUT/ckpt.json 2>&1 | tail -2
  [ -d /tmp/fake ] || python3 bench.py --skip train sample --data /tmp/fake --fake-samples 4096 --data-batches 1 > $OUT/data.txt 2>&1
  echo "== train loop eager, checkpoints $SECONDS"; rm -rf /tmp/run
  timeout -s INT 180 python3 train.py $XL --micro-batch ${MB:-64} --no-compile $TRAIN_EXTRA --data /tmp/fake --steps 120 --log-every 10 --sample-every 0 --ckpt-every 40 --keep 1 --out /tmp/run > $OUT/train.txt 2>&1; echo rc $? at $SECONDS
  tr '\r' '\n' < $OUT/train.txt | grep -E "^step .*checkpoint|^done|Error|error" | head; cp /tmp/run/phase1/log.jsonl $OUT/ 2>/dev/null
  python3 -c "
import json; r=[json.loads(l) for l in open('/tmp/run/phase1/log.jsonl')]
print(' '.join(f\"{x['step']}:{x['ms_per_step']:.1f}\" for x in r[9::10]))"
  for v in default graphs cd; do
    [ $SECONDS -gt 480 ] && break
    I='{}'; P=""; [ $v = default ] && P="--profile"
    [ $v = graphs ] && I='{"triton.cudagraphs": true}'; [ $v = cd ] && I='{"coordinate_descent_tuning": true}'
    echo "== depth 8 $v $SECONDS"; timeout $((570 - SECONDS)) python3 bench.py $XL $D8 --masks 0.75 --compile on --inductor "$I" $P --rounds 8 --warmup 3 --skip sample data --json $OUT/d8_$v.json > $OUT/d8_$v.txt 2>&1; echo rc $? at $SECONDS; grep "^train" $OUT/d8_$v.txt; grep -A6 "device idle" $OUT/d8_$v.txt
  done
fi
if [ "$1" = G ]; then
  echo "== depth 8 trace $SECONDS"; timeout 240 python3 bench.py $XL $D8 --masks 0.75 --compile on --trace $OUT/d8_trace.json.gz --rounds 8 --warmup 3 --skip sample data --json $OUT/d8_trace.json > $OUT/d8_trace.txt 2>&1; echo rc $? at $SECONDS; grep "^train" $OUT/d8_trace.txt; grep -A6 "device idle" $OUT/d8_trace.txt; ls -la $OUT
fi
