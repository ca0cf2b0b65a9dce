#!/usr/bin/env bash
# local-slurm.sh - a real Slurm "cluster" of N emulated nodes on ONE machine, for testing slurm/*.sbatch.
#
# Debian 12's Slurm 22.05 (built with MULTIPLE_SLURMD) + munge; no systemd, no cgroups needed. Run as root.
# Everything Slurm-side lives under $LOCAL_SLURM_ROOT with its own slurm.conf and ports, so a machine's own
# /etc/slurm and a real slurmctld are never touched. Client commands need `export SLURM_CONF=$ROOT/slurm.conf`
# (printed by `start` and `env`).
#
#   local-slurm.sh start     install missing packages (.ci/system-deps.sh), write the config, start munged,
#                            slurmctld and one slurmd per node, wait until every node is idle. Idempotent:
#                            daemons already running with the same config are left alone.
#   local-slurm.sh stop      cancel all jobs, stop slurmctld and the slurmds (and munged if we started it)
#   local-slurm.sh status    daemons and `sinfo -N`
#   local-slurm.sh env       print `export SLURM_CONF=...`
#
# Environment variables (defaults):
#   LOCAL_SLURM_ROOT=/var/tmp/albert-slurm   config, state, spool, logs, pid files of this cluster
#   LOCAL_SLURM_NODES=2             emulated nodes ${PREFIX}1..${PREFIX}N, one `slurmd -N name` each on its own port
#   LOCAL_SLURM_NODE_PREFIX=node    node name prefix; the names are mapped to 127.0.0.1 in /etc/hosts (a line
#                                   ending in "# local-slurm"), because jobs resolve the first node's name to
#                                   find rank 0 (MASTER_ADDR)
#   LOCAL_SLURM_CPUS=$(nproc)       CPUs advertised per node (each node is the whole host: oversubscribed on purpose)
#   LOCAL_SLURM_MEM_MB=auto         RealMemory per node (auto: 80% of MemTotal / N)
#   LOCAL_SLURM_FAKE_GPUS=0         K>0: Gres=gpu:K per node, backed by character devices that are copies of
#                                   /dev/null, so GPU jobs (--gpus-per-node) are accepted and get
#                                   CUDA_VISIBLE_DEVICES as on real GPU nodes (torch still sees no GPU)
#   LOCAL_SLURM_PORT=16817          slurmctld port; the slurmds use LOCAL_SLURM_PORT+100+i (i = 1..N)
# Logs: $ROOT/log/slurmctld.log, $ROOT/log/slurmd-<node>.log, finished jobs in $ROOT/log/jobcomp.log.
set -euo pipefail

ACTION=${1:-start}
ROOT=${LOCAL_SLURM_ROOT:-/var/tmp/albert-slurm}
N=${LOCAL_SLURM_NODES:-2}
PFX=${LOCAL_SLURM_NODE_PREFIX:-node}
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}
GPUS=${LOCAL_SLURM_FAKE_GPUS:-0}
PORT=${LOCAL_SLURM_PORT:-16817}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
HOST=$(hostname -s)
CONF=$ROOT/slurm.conf
RUN=$ROOT/run
export SLURM_CONF=$CONF
log() { echo "[local-slurm] $*" >&2; }

nodes() { local i; for ((i = 1; i <= N; i++)); do echo "$PFX$i"; done; }
# running PID COMM: PID is a live (not zombie) process called COMM
running() { [ -r "/proc/$1/stat" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# alive PIDFILE COMM: the pid file names a live process called COMM
alive() { local p; [ -s "$1" ] && p=$(cat "$1" 2>/dev/null) && running "$p" "$2"; }
stop_pidfile() { # stop_pidfile PIDFILE COMM: SIGTERM, wait for the process itself (daemons remove their pid
  local p             # file before they are gone), SIGKILL after 15 s
  p=$(cat "$1" 2>/dev/null) || { rm -f "$1"; return 0; }
  running "$p" "$2" || { rm -f "$1"; return 0; }
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 75); do running "$p" "$2" || break; sleep 0.2; done
  if running "$p" "$2"; then log "$2 ($p) ignored SIGTERM, sending SIGKILL"; kill -KILL "$p" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$1"
}
stop_slurm() {
  if alive "$RUN/slurmctld.pid" slurmctld; then
    local jobs; jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086  # one argument per job ID
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
  fi
  local f; for f in "$RUN"/slurmd-*.pid; do if [ -e "$f" ]; then stop_pidfile "$f" slurmd; fi; done
  stop_pidfile "$RUN/slurmctld.pid" slurmctld
}

case "$ACTION" in
  env) echo "export SLURM_CONF=$CONF"; exit 0 ;;
  stop)
    [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
    stop_slurm
    if [ -e "$RUN/munged.ours" ]; then stop_pidfile /run/munge/munged.pid munged; rm -f "$RUN/munged.ours"; fi
    log "stopped"; exit 0 ;;
  status)
    for n in $(nodes); do if alive "$RUN/slurmd-$n.pid" slurmd; then echo "slurmd $n up"; else echo "slurmd $n DOWN"; fi; done
    if alive "$RUN/slurmctld.pid" slurmctld; then echo "slurmctld up"; sinfo -N; else echo "slurmctld DOWN"; fi
    exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status|env]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
t0=$SECONDS

# ---- 1. packages: munge, slurmctld, slurmd, slurm-client, libpmix2 (and OpenMPI), only when missing -------
bash "$REPO/.ci/system-deps.sh" || { log "could not install the Slurm packages (.ci/system-deps.sh failed)"; exit 3; }
for b in munged slurmctld slurmd sbatch; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || { log "$b not installed (see .ci/system-deps.sh)"; exit 3; }
done

# ---- 2. names: the emulated nodes (and this host) resolve to 127.0.0.1 ----------------------------------------
want="127.0.0.1 $(nodes | tr '\n' ' ')# local-slurm"
if ! grep -qxF "$want" /etc/hosts; then
  tmp=$(mktemp)
  { grep -v '# local-slurm$' /etc/hosts || true; echo "$want"; } > "$tmp"
  cat "$tmp" > /etc/hosts; rm -f "$tmp"   # rewritten in place: /etc/hosts may be a bind mount
fi
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST # local-slurm-host" >> /etc/hosts

# ---- 3. directories -------------------------------------------------------------------------------------------
install -d -m 0755 "$ROOT" "$ROOT/spool" "$ROOT/tmp"
install -d -o slurm -g slurm -m 0755 "$RUN" "$ROOT/log" "$ROOT/state"
for n in $(nodes); do install -d -m 0755 "$ROOT/spool/$n" "$ROOT/tmp/$n"; done

# ---- 4. munge (the machine's own munged when one runs, else ours) -------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if alive /run/munge/munged.pid munged; then kill "$(cat /run/munge/munged.pid)"; sleep 1; fi
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  touch "$RUN/munged.ours"
  for _ in $(seq 1 25); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || { log "munged failed; see /var/log/munge/munged.log"; exit 1; }
fi

# ---- 5. slurm.conf (+ gres.conf) ------------------------------------------------------------------------------
if [ "${LOCAL_SLURM_MEM_MB:-auto}" = auto ]; then
  MEM=$(awk -v n="$N" '/MemTotal/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)
else MEM=$LOCAL_SLURM_MEM_MB; fi
GRES_NODE=""; GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then GRES_NODE="Gres=gpu:$GPUS"; GRES_TYPES="GresTypes=gpu"; fi
if [ "$N" = 1 ]; then NODESPEC="${PFX}1"; PORTSPEC=$((PORT + 101)); else NODESPEC="${PFX}[1-$N]"; PORTSPEC="[$((PORT + 101))-$((PORT + 100 + N))]"; fi
new=$(mktemp)
cat > "$new" <<EOF
# generated by tests/slurm/local-slurm.sh: $N emulated nodes on host $HOST
ClusterName=albertci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=10
MailProg=/bin/true
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
TmpFS=$ROOT/tmp/%n
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
$GRES_TYPES
NodeName=$NODESPEC NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORTSPEC CPUs=$CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
changed=0
cmp -s "$new" "$CONF" || { install -m 0644 "$new" "$CONF"; changed=1; }
rm -f "$new"
if [ "$GPUS" -gt 0 ]; then
  # gres/gpu drops GPUs without File=, and File= must be a character device: fake ones are copies of /dev/null
  for ((i = 0; i < GPUS; i++)); do
    [ -c "$ROOT/fakegpu$i" ] || { rm -f "$ROOT/fakegpu$i"; mknod -m 0666 "$ROOT/fakegpu$i" c 1 3; }
  done
  if [ "$GPUS" = 1 ]; then files=$ROOT/fakegpu0; else files="$ROOT/fakegpu[0-$((GPUS - 1))]"; fi
  g="NodeName=$NODESPEC Name=gpu File=$files"
  [ "$(cat "$ROOT/gres.conf" 2>/dev/null)" = "$g" ] || { echo "$g" > "$ROOT/gres.conf"; changed=1; }
elif [ -e "$ROOT/gres.conf" ]; then rm -f "$ROOT/gres.conf"; changed=1; fi

# ---- 6. daemons -------------------------------------------------------------------------------------------------
all_up=1
alive "$RUN/slurmctld.pid" slurmctld || all_up=0
for n in $(nodes); do alive "$RUN/slurmd-$n.pid" slurmd || all_up=0; done
if [ $changed = 1 ] || [ $all_up = 0 ]; then
  if [ $changed = 1 ]; then log "config changed: (re)starting daemons"; else log "starting daemons"; fi
  stop_slurm
  slurmctld -f "$CONF" || { tail -n 20 "$ROOT/log/slurmctld.log"; exit 1; }
  for n in $(nodes); do slurmd -f "$CONF" -N "$n" || { tail -n 20 "$ROOT/log/slurmd-$n.log"; exit 1; }; done
fi

# ---- 7. wait until every node is idle ---------------------------------------------------------------------------
ok=0
for _ in $(seq 1 120); do
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
  if [ -n "$states" ] && ! echo "$states" | grep -qvE ' (idle|mix|alloc)$'; then ok=1; break; fi
  # nodes left down or drained by an earlier run: resume them
  echo "$states" | awk '$2 ~ /(down|drain|drng)/ {print $1}' | while read -r n; do
    scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
  sleep 0.5
done
[ $ok = 1 ] || { sinfo -N >&2 || true; log "nodes not idle; see $ROOT/log/*.log"; exit 1; }
log "ready: $N nodes x $CPUS CPUs${GRES_NODE:+ ($GRES_NODE)} in $((SECONDS - t0)) s; export SLURM_CONF=$CONF"
