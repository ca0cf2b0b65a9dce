#!/usr/bin/env bash
# Installs the system packages the project needs and pip cannot provide (Debian/Ubuntu, apt):
#   - OpenMPI (openmpi-bin libopenmpi-dev): mpi4py's wheel bundles no MPI library;
#   - Slurm and munge (munge slurmctld slurmd slurm-client libpmix2): the tests in tests/test_slurm.py
#     bring up a real two-node Slurm cluster on this machine (tests/slurm/local-slurm.sh) and submit
#     slurm/*.sbatch to it. libpmix2 makes `srun --mpi=pmix` work with Debian's OpenMPI.
# Idempotent: installs only what is missing, so a second run does nothing (and needs no network).
# Environment:
#   SYSTEM_DEPS_SLURM=auto   auto: the Slurm packages when running as root (CI; the Slurm tests need root and are
#                            skipped otherwise), 1: also through sudo, 0: never
# The daemons are NOT started here: installing Slurm packages without an init system must not try to start
# them (a temporary /usr/sbin/policy-rc.d says so); tests/slurm/local-slurm.sh starts and stops them.
set -euo pipefail
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
want_slurm=${SYSTEM_DEPS_SLURM:-auto}
if [ "$want_slurm" = auto ]; then if [ "$(id -u)" -eq 0 ]; then want_slurm=1; else want_slurm=0; fi; fi
if [ "$want_slurm" = 1 ] && command -v dpkg-query >/dev/null 2>&1; then
  for p in munge slurmctld slurmd slurm-client libpmix2; do pkg_installed "$p" || need+=("$p"); done
fi
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing system packages: ${need[*]}" >&2
made_policy=0
cleanup() { if [ $made_policy = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT  # set first: a failure below must not leave the file blocking every later daemon start
if [ ! -e /usr/sbin/policy-rc.d ]; then
  # no init system on CI containers: keep the packages' postinst scripts from starting daemons
  made_policy=1
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
