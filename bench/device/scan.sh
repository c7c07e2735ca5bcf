# Issue 16 part 2: the M and R scans and the bundled model at the size, eager and
# compiled. Run from the repository root after `source bench/device/setup.sh`; logs in $OUT.
# Timeouts sum to 410 s.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DEV=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')
# 1. Old vs new scan, forward + backward of one block, interleaved (ratios), at the size
#    and a smaller one, both chunk sizes (M also without the scan's checkpoint; peaks).
timeout 90 python3 bench/scan_speed.py --device cuda --shapes 8x2048x1024,8x1024x512 \
  --chunks 16,64 --rounds 5 --warmup 2 > $OUT/scan_speed_cuda.log 2>&1
echo "scan_speed rc=$?"; grep "^scan_speed" $OUT/scan_speed_cuda.log
# 1b. Where the new M block's time goes at the size (top device ops, one step).
timeout 40 python3 bench/scan_speed.py --device cuda --shapes 8x2048x1024 --chunks 16 --blocks M \
  --rounds 1 --profile > $OUT/scan_profile_cuda.log 2>&1
echo "scan profile rc=$?"
# 2. The bundled model at the size (AEMEAEMEAEMR d1024, 16 experts top-2, seq 2048,
#    batch 8), eager: step time, tokens/s, MFU, peak memory, per-family times.
timeout 70 python3 bench/gpu_model_breakdown.py --steps 20 --spool /tmp/spool_eager \
  > $OUT/breakdown_eager.log 2>&1
echo "breakdown eager rc=$?"; grep -E "^(params|family|full|optimizer|peak|train)" $OUT/breakdown_eager.log
timeout 20 python3 bench/spool_summary.py /tmp/spool_eager 5 "$DEV" > $OUT/summary_eager.log 2>&1
echo "summary eager rc=$?"; head -6 $OUT/summary_eager.log
# 3. The same compiled, plus each family compiled alone.
timeout 170 python3 bench/gpu_model_breakdown.py --steps 20 --compile --spool /tmp/spool_compile \
  > $OUT/breakdown_compile.log 2>&1
echo "breakdown compile rc=$?"; grep -E "^(params|family|full|optimizer|peak|train)" $OUT/breakdown_compile.log
timeout 20 python3 bench/spool_summary.py /tmp/spool_compile 5 "$DEV" > $OUT/summary_compile.log 2>&1
echo "summary compile rc=$?"; head -6 $OUT/summary_compile.log
# 4. Both runs' spools (without the profiler's traces), to replay into a service elsewhere
#    for the dashboards' screenshots (`goodput spool replay`).
tar czf $OUT/spools.tgz --exclude=traces -C /tmp spool_eager spool_compile; ls -la $OUT
