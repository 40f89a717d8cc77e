#!/usr/bin/env bash
# CI: install a one-node SLURM with accounting (Debian/Ubuntu packages) for tests/integration/test_slurm.py.
# Idempotent and tolerant: whatever fails, it says why and exits 0, and the SLURM tests skip with the reason.
# The daemons are not started here (tests start private ones via lightning_firecaffe.testing.slurm).
set -u
PKGS="slurm-wlm munge slurmdbd mariadb-server"
BINS="slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db sbatch srun sacct"

have_all() {
    for b in $BINS; do PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1; done
}

if have_all; then
    echo "install-slurm: already installed ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-slurm: not root, cannot apt-get install $PKGS; SLURM tests will be skipped"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: no apt-get on this system; SLURM tests will be skipped"
    exit 0
fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# Where the packages start system services (munge, mariadb), they do not disturb the tests: those use a
# private munge socket, database, ports and SLURM_CONF.
if apt-get update -qq >"$log" 2>&1 &&
   apt-get install -y -qq --no-install-recommends $PKGS >>"$log" 2>&1; then
    echo "install-slurm: installed $PKGS ($(PATH="$PATH:/usr/sbin" slurmctld -V 2>/dev/null))"
else
    echo "install-slurm: apt-get failed, SLURM tests will be skipped; last lines:"
    tail -n 15 "$log" | sed 's/^/  /'
fi
rm -f "$log"
exit 0
