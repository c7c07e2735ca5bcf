# Sourced at the top of a device call (the lent GPU machines: no network, root, python3 with
# torch): installs the service's wheels carried in .whl/ (bench/device/README.md says how to
# fetch them) into /tmp/site, starts PostgreSQL 16 from the pgserver wheel's binaries as an
# unprivileged user on 127.0.0.1:5432 (trust auth, like this project's test database), and
# stands in for git where the machine has none. Run from the repository root.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
chmod -R a+rX /tmp/site
PGB=/tmp/site/pgserver/pginstall/bin
id pgu >/dev/null 2>&1 || useradd -m pgu
if [ ! -d /tmp/pgdata ]; then
  mkdir -p /tmp/pgdata && chown pgu /tmp/pgdata
  runuser -u pgu -- $PGB/initdb -D /tmp/pgdata -A trust -U postgres >/tmp/initdb.log 2>&1 \
    || { cat /tmp/initdb.log; return 1; }
fi
runuser -u pgu -- $PGB/pg_ctl -D /tmp/pgdata -o "-p 5432 -k /tmp -c max_connections=200" \
  -l /tmp/pg.log -w status >/dev/null 2>&1 \
  || runuser -u pgu -- $PGB/pg_ctl -D /tmp/pgdata -o "-p 5432 -k /tmp -c max_connections=200" \
    -l /tmp/pg.log -w start >/dev/null || { cat /tmp/pg.log; return 1; }
if ! command -v git >/dev/null; then  # the benches' headers ask git which commit ran
  mkdir -p /tmp/bin && printf '#!/bin/sh\necho "%s"\n' "${GOODPUT_COMMIT:-unknown}" >/tmp/bin/git
  chmod +x /tmp/bin/git && export PATH=/tmp/bin:$PATH
fi
echo "setup: $(nproc) cores; $(python3 -c 'import torch,sys;print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))'); $($PGB/postgres --version)"
