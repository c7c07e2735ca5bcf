# Issues 12 and 16 in one call (about 9 minutes; each step's timeout bounds it): the load
# bench's target setup, the bundled model's run eager and compiled for its spools (the
# dashboards are shot from them elsewhere: bench/gpu_run_screenshots.py), and the hooks'
# host-bound step-time ratio with many short blocks, twice. Run from the repository root
# after `source bench/device/setup.sh`; logs and spools in $OUT.
DEV=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
timeout 170 python3 bench/load.py --setups pg4 --ranks 64 --runs 1,16 --duration 60 \
  > $OUT/load_64_pg4.log 2>&1
echo "load rc=$?"; grep "^load:" $OUT/load_64_pg4.log | cut -c1-300
timeout 60 python3 bench/gpu_model_breakdown.py --steps 20 --no-families --spool /tmp/spool_eager \
  > $OUT/run_eager.log 2>&1
echo "eager rc=$?"; python3 bench/spool_summary.py /tmp/spool_eager 5 "$DEV" > $OUT/summary_eager.log 2>&1
head -8 $OUT/summary_eager.log
HOST="--device cuda --pattern AE --d-model 128 --seq-len 128 --batch-size 4 --num-experts 8 --blocks 60 --steps-per-block 20"
for i in 1 2; do
  timeout 45 python3 bench/hooks_overhead.py $HOST > $OUT/hooks_host_$i.log 2>&1
  grep -E "hooks_overhead:|median step wall" $OUT/hooks_host_$i.log
done
tar czf $OUT/spools.tgz --exclude=traces -C /tmp spool_eager
# Last, for what time is left: the compiled model (its compile took over 290 s here).
timeout ${COMPILE_S:-200} python3 bench/gpu_model_breakdown.py --steps 20 --no-families --compile \
  --spool /tmp/spool_compile > $OUT/run_compile.log 2>&1
echo "compile rc=$?"; grep -E "train wall|peak" $OUT/run_compile.log
python3 bench/spool_summary.py /tmp/spool_compile 5 "$DEV" > $OUT/summary_compile.log 2>&1
head -8 $OUT/summary_compile.log
tar czf $OUT/spools.tgz --exclude=traces -C /tmp spool_eager spool_compile 2>/dev/null
