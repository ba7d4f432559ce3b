#!/usr/bin/env bash
# A real one-node Slurm on this machine, for hvdllm's Slurm tests (tests/integration/test_slurm.py) and for
# trying `hvdllm launch --launcher srun|sbatch` without a cluster:
#   bash scripts/slurm_local.sh          install (Debian slurm-wlm + munge) if missing, start
#                                        munged, slurmctld and slurmd, wait until the node is idle
#   bash scripts/slurm_local.sh stop     stop the daemons started here
# It never touches /etc/slurm: the config lives in $HVDLLM_SLURM_DIR (default /tmp/hvdllm-slurm)
# and clients find it through SLURM_CONF=$HVDLLM_SLURM_DIR/slurm.conf. Needs root (the daemons,
# apt). Idempotent: a second call with the daemons up returns at once.
set -euo pipefail
D=${HVDLLM_SLURM_DIR:-/tmp/hvdllm-slurm}
CONF=$D/slurm.conf
export SLURM_CONF=$CONF
say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

stop() {
  for p in slurmd slurmctld; do
    [[ -f $D/$p.pid ]] && kill "$(cat "$D/$p.pid")" 2>/dev/null || true
  done
}
if [[ ${1:-} == stop ]]; then stop; exit 0; fi

[[ $(id -u) == 0 ]] || die "needs root (it starts slurmctld, slurmd and munged)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "no slurmctld/munged and no apt-get: install Slurm and MUNGE"
  say "installing Debian's slurm-wlm and munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node_idle() { sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }
if [[ -f $CONF ]] && node_idle; then
  exit 0
fi

mkdir -p "$D/state" "$D/spool"
host=$(hostname -s)
cpus=$(nproc)
cat > "$CONF" <<EOF
# written by hvdllm scripts/slurm_local.sh: one node, every core, no cgroups
ClusterName=hvdllm
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

# MUNGE: a key (the package makes one; create it if not), then the daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge
if ! munge -n >/dev/null 2>&1; then
  munged --force
fi

stop
sleep 0.5
slurmctld -f "$CONF"
slurmd -f "$CONF"
for _ in $(seq 1 60); do   # deadline: 30 s
  if node_idle; then
    say "up: node $host, $cpus CPUs, partition 'local'; export SLURM_CONF=$CONF"
    exit 0
  fi
  scontrol -f "$CONF" update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
tail -5 "$D/slurmctld.log" "$D/slurmd.log" >&2 || true
die "the node did not become idle within 30 s (logs above, in $D)"
