# shellcheck shell=bash
# slurm/common.sh - what slurm/prep.sbatch and slurm/pretrain.sbatch share. Sourced by them, never run or
# submitted itself; sourcing it only defines the functions below (so tests can call them one by one).
#
# Under sbatch a job runs a copy of its script in Slurm's spool folder, not the file in the checkout, so each
# script finds this file itself: in REPO/slurm when REPO is set, beside the submitted script (its path from
# `scontrol show job`), beside the running script (run by hand), or in the submission folder's slurm/.
# ME (the script's name, for its log lines) and COMMON (the folder this file was found in) are set by the script.

say() { echo "[${ME:-slurm} $(date +%H:%M:%S)] $*"; }
die() { say "ERROR: $1"; exit "${2:-2}"; }

# setup_job PACKAGE: the common start of a job. Refuses to run outside Slurm; REPO (default: the folder above the
# slurm/ this file is in; it must hold PACKAGE/) goes on PYTHONPATH, so `python -m PACKAGE` runs from the checkout
# while the job stays in the submission folder (relative paths mean what they meant there); then MODULES,
# SITE_ENV, VENV and PYTHON, as both scripts' headers describe them.
setup_job() {
  [ -n "${SLURM_JOB_ID:-}" ] || die "submit with sbatch (this script runs inside a Slurm job)"
  REPO=${REPO:-$(cd "$COMMON/.." && pwd)}
  [ -d "$REPO/$1" ] || die "REPO=$REPO is not the project checkout (no $1/); set REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

  MODULES=${MODULES:-}
  if [ -n "$MODULES" ]; then
    if ! type module >/dev/null 2>&1; then
      # shellcheck disable=SC1090
      for f in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do [ -r "$f" ] && . "$f" && break; done
    fi
    type module >/dev/null 2>&1 || die "MODULES=$MODULES but the module command is not available"
    # shellcheck disable=SC2086
    module load $MODULES || die "module load $MODULES failed"
  fi
  if [ -n "${SITE_ENV:-}" ]; then
    # shellcheck disable=SC1090
    . "$SITE_ENV" || die "SITE_ENV=$SITE_ENV could not be sourced"
  fi
  VENV=${VENV-$REPO/.venv}
  if [ -n "$VENV" ]; then
    [ -r "$VENV/bin/activate" ] || die "VENV=$VENV: no virtual environment there (make venv), or set VENV= to use the python on PATH"
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
  fi
  PYTHON=${PYTHON:-python}
  # srun (Slurm >= 22.05) no longer inherits --cpus-per-task from the job: pass it on explicitly
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}; fi
}

# container_launch DEFAULT_ARGS: the array `launch`, the command that runs a task's program: empty on the host,
# `$CONTAINER_RUNTIME exec ${CONTAINER_ARGS:-DEFAULT_ARGS} $CONTAINER` when CONTAINER is set
container_launch() {
  launch=()
  if [ -n "${CONTAINER:-}" ]; then
    # shellcheck disable=SC2034,SC2206  # used by the scripts; word splitting of the options wanted
    launch=(${CONTAINER_RUNTIME:-apptainer} exec ${CONTAINER_ARGS:-$1} "$CONTAINER")
  fi
}

# option_value NAME DEFAULT ARGS...: the value of the last `NAME V` or `NAME=V` in ARGS (the one argparse keeps),
# else DEFAULT. The scripts check some of the values their program will use (--output, --data) themselves.
option_value() {
  local name=$1 value=$2 i
  shift 2
  for ((i = 1; i <= $#; i++)); do
    case "${!i}" in
      "$name") local next=$((i + 1)); value=${!next:-} ;;
      "$name"=*) value=${!i#*=} ;;
    esac
  done
  printf '%s\n' "$value"
}

# gpus_per_node: the GPUs per node of this job (pretrain.sbatch), from GPUS_PER_NODE, else SLURM_GPUS_PER_NODE
# (--gpus-per-node=[type:]count; several types add up: "a100:2,v100:2" is 4), else SLURM_GPUS_ON_NODE (also set
# by --gres=gpu:N and --gpus-per-task). Prints the count, 0 for a job without GPUs; prints a message and fails
# when the value cannot be read, or when the job has GPUs (SLURM_GPUS, SLURM_JOB_GPUS ...) that cannot be counted.
gpus_per_node() {
  local var value item n total=0
  local -a items
  for var in GPUS_PER_NODE SLURM_GPUS_PER_NODE SLURM_GPUS_ON_NODE; do
    value=${!var:-}
    [ -n "$value" ] || continue
    while [[ "$value" == *"("*")"* ]]; do value=${value%%(*}${value#*)}; done   # "gpu:4(IDX:0-3)" -> "gpu:4"
    IFS=, read -ra items <<< "$value"
    for item in "${items[@]}"; do
      n=${item##*:}
      [[ "$n" =~ ^[0-9]+$ ]] || { echo "cannot read the GPUs per node from $var=${!var} (expected [type:]count, e.g. 4 or a100:4): set GPUS_PER_NODE=N, or ALBERT_CPU=1 for CPU mode"; return 1; }
      total=$((total + 10#$n))
    done
    [ "${#items[@]}" -gt 0 ] || { echo "cannot read the GPUs per node from $var=${!var}: set GPUS_PER_NODE=N, or ALBERT_CPU=1 for CPU mode"; return 1; }
    echo "$total"
    return 0
  done
  for var in SLURM_GPUS SLURM_GPUS_PER_TASK SLURM_JOB_GPUS SLURM_STEP_GPUS; do
    value=${!var:-}
    # SLURM_GPUS / SLURM_GPUS_PER_TASK are counts (0: none); SLURM_JOB_GPUS / SLURM_STEP_GPUS list GPU indices ("0": GPU 0)
    if [ -n "$value" ] && { [ "$value" != 0 ] || [[ "$var" == *_JOB_GPUS || "$var" == *_STEP_GPUS ]]; }; then
      echo "the job has GPUs ($var=$value) but not their number per node (no SLURM_GPUS_PER_NODE / SLURM_GPUS_ON_NODE): set GPUS_PER_NODE=N or submit with --gpus-per-node=N; ALBERT_CPU=1 for CPU mode"
      return 1
    fi
  done
  echo 0
}
