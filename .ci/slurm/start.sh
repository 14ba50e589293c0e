#!/usr/bin/env bash
# Bring up a real one-node SLURM cluster on this machine (slurmctld + slurmd, munge auth)
# that declares two fake GPUs as gres, so that `sbatch --gpus=N` jobs get
# CUDA_VISIBLE_DEVICES from SLURM exactly as on a GPU cluster. Needs root.
#
#   .ci/slurm/start.sh        # install slurm-wlm + munge if missing, start, wait for idle
#   .ci/slurm/stop.sh         # stop the daemons by PID
#
# State, spool, logs and PID files live under $SPECDEC_SLURM_DIR (default /tmp/specdec-slurm);
# the config goes to /etc/slurm so that every client (sinfo, sbatch, Snakemake's plugin)
# finds it without SLURM_CONF.
set -euo pipefail

STATE_DIR=${SPECDEC_SLURM_DIR:-/tmp/specdec-slurm}
CONF_DIR=/etc/slurm
FAKE_GPUS=(/dev/null /dev/zero)   # one harmless device file per fake GPU (slurmd needs distinct File=)
START_NS=$(date +%s%N)

# A clean start even if an earlier cluster is still up.
"$(dirname "$0")/stop.sh"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: the daemon must run as user munge with its socket directory owned by munge.
if ! munge -n >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey -c
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

mkdir -p "$STATE_DIR"/{state,spool,log} "$CONF_DIR"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)

cat > "$CONF_DIR/slurm.conf" <<CONF
# Written by .ci/slurm/start.sh: a one-node test cluster with two fake GPUs.
ClusterName=specdec
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# Finished jobs stay visible to squeue for an hour: Snakemake's squeue status check needs them.
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:${#FAKE_GPUS[@]} State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

: > "$CONF_DIR/gres.conf"
for dev in "${FAKE_GPUS[@]}"; do
    echo "NodeName=$HOST Name=gpu File=$dev" >> "$CONF_DIR/gres.conf"
done

# -c: cold start, forgetting jobs of an earlier run of this script.
slurmctld -c
slurmd
for _ in $(seq 100); do
    [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ] && break
    sleep 0.2
done
state=$(sinfo -h -N -o %T 2>/dev/null || true)
if [ "$state" != idle ]; then
    echo "SLURM node did not become idle (state: '${state:-no answer}'); logs in $STATE_DIR/log" >&2
    exit 1
fi
echo -n "SLURM cluster up in $(( ($(date +%s%N) - START_NS) / 1000000 )) ms: "
sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G'
