# Issues 12 and 16 in one call (under 10 minutes; each step's timeout bounds it): the load
# bench's target setup; the fused M scan's GPU tests and speed (GOODPUT_FUSED_SCAN=0 for the
# rest if its tests fail); the bundled model's run eager and compiled for its spools (the
# dashboards are shot from them elsewhere: bench/gpu_run_screenshots.py); the hooks'
# host-bound step-time ratio with many short blocks, twice. Run from the repository root
# after `source bench/device/setup.sh`; logs and spools in $OUT (8 files at most).
DEV=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
timeout 170 python3 bench/load.py --setups pg4 --ranks 64 --runs 1,16 --duration 60 \
  > $OUT/load_64_pg4.log 2>&1
echo "load rc=$?"; grep "^load:" $OUT/load_64_pg4.log | cut -c1-300
{ timeout 100 python3 -m pytest -q -p no:cacheprovider --noconftest tests/moe_core/test_scan_fused.py
  echo "fused tests rc=$?"
  timeout 60 python3 bench/scan_speed.py --device cuda --shapes 8x2048x1024 --chunks 16 --blocks M \
    --rounds 3 --warmup 1; } > $OUT/fused.log 2>&1
grep -E "passed|failed|rc=|^scan_speed" $OUT/fused.log
grep -q "fused tests rc=0" $OUT/fused.log || export GOODPUT_FUSED_SCAN=0
timeout 60 python3 bench/gpu_model_breakdown.py --steps 20 --no-families --spool /tmp/spool_eager \
  > $OUT/run_eager.log 2>&1
echo "eager rc=$?"; python3 bench/spool_summary.py /tmp/spool_eager 5 "$DEV" > $OUT/summary_eager.log 2>&1
head -8 $OUT/summary_eager.log
HOST="--device cuda --pattern AE --d-model 128 --seq-len 128 --batch-size 4 --num-experts 8 --blocks 60 --steps-per-block 20"
for i in 1 2; do
  timeout 35 python3 bench/hooks_overhead.py $HOST > $OUT/hooks_host_$i.log 2>&1
  grep -E "hooks_overhead:|median step wall" $OUT/hooks_host_$i.log
done
tar czf $OUT/spools.tgz --exclude=traces -C /tmp spool_eager
# Last, for what time is left: the compiled model.
timeout ${COMPILE_S:-120} python3 bench/gpu_model_breakdown.py --steps 20 --no-families --compile \
  --spool /tmp/spool_compile > $OUT/run_compile.log 2>&1
echo "compile rc=$?"; grep -E "train wall|peak" $OUT/run_compile.log
python3 bench/spool_summary.py /tmp/spool_compile 5 "$DEV" >> $OUT/run_compile.log 2>&1
grep -A7 "^steps" $OUT/run_compile.log
tar czf $OUT/spools.tgz --exclude=traces -C /tmp spool_eager spool_compile 2>/dev/null
