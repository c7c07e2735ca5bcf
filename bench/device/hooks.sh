# Issue 16 part 1 on a GPU: the hooks' host time per step (--drain, 12 AE pairs of 128
# experts; target 50 us on an H200) and a host-bound configuration under 10 ms steps, then the
# GPU tests under torch.cuda.set_sync_debug_mode("error"). With OLD set to a folder holding an
# earlier commit's trainer_hooks, moe_core and bench (git archive), that tree runs beside this
# one. Run from the repository root after `source bench/device/setup.sh`; log in $OUT.
LOG=$OUT/hooks_gpu.log
nvidia-smi -L | tee -a $LOG
run() {  # TAG SECONDS PYTHONPATH CMD...
  local tag=$1 limit=$2 path=$3; shift 3
  echo "=== $tag: $*" | tee -a $LOG
  PYTHONPATH=$path timeout $limit "$@" 2>&1 | tee -a $LOG \
    | grep -E "hooks_overhead:|median step wall|mean host|passed|failed|Error"
}
E12="--device cuda --pattern AE*12 --num-experts 128 --d-model 256 --seq-len 1024 --batch-size 8 --blocks 4 --steps-per-block 20 --drain"
HOST="--device cuda --pattern AE --d-model 128 --seq-len 128 --batch-size 4 --num-experts 8 --blocks 20 --steps-per-block 40"
for tree in new ${OLD:+old}; do
  if [ $tree = new ]; then P=/tmp/site:$PWD; B=bench; else P=/tmp/site:$OLD:$PWD; B=$OLD/bench; fi
  run e12_drain_$tree 90 "$P" python3 $B/hooks_overhead.py $E12
  run host_$tree 90 "$P" python3 $B/hooks_overhead.py $HOST
done
run gpu_tests 120 "/tmp/site:$PWD" python3 -m pytest -q -p no:cacheprovider --noconftest -m gpu \
  tests/moe_core/test_dispatch.py tests/trainer_hooks/test_gpu_sync_free.py
