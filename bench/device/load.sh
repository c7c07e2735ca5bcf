# Issue 12's load bench on a many-core device host (absolute latencies count from there):
# 64 ranks on PostgreSQL with 4 and with 16 API processes, one run and 16 runs. Run from the
# repository root after `source bench/device/setup.sh`; logs in $OUT. About 5 minutes.
for w in 4 16; do
  timeout 150 python3 bench/load.py --setups pg$w --ranks 64 --runs 1,16 --duration 60 \
    > $OUT/load_64_pg${w}.log 2>&1
  echo "pg$w rc=$?"; grep "^load:" $OUT/load_64_pg${w}.log | cut -c1-240
done
