#!/bin/bash
# shellcheck disable=SC2015  # "check && check || die" is meant
# tests/slurm_lab/up.sh - a real multi-node Slurm cluster on ONE Linux machine.
#
# Every compute node is a slurmd in its own network namespace + UTS namespace:
# its own hostname (node1..nodeN) and its own IP on a private bridge.  So every
# node can bind 0.0.0.0:9000 without collisions, and the nodes reach each other
# by the names in SLURM_JOB_NODELIST.  slurmctld runs in the host network
# namespace, in a private UTS namespace whose hostname matches SlurmctldHost.
# Every node also advertises fake GPUs (gres/gpu backed by /dev/null-like
# device nodes), so "#SBATCH --gpus-per-node=8" jobs schedule and Slurm sets
# CUDA_VISIBLE_DEVICES in job steps as on a GPU cluster.  Takes about 1 s.
#
# Usage (as root; Debian packages slurmctld slurmd slurm-client munge):
#   bash tests/slurm_lab/down.sh; bash tests/slurm_lab/up.sh
#   srun -N3 hostname
#   bash tests/slurm_lab/down.sh
# Always run down.sh first (it clears a stale lab left by a killed session;
# up.sh refuses to start over one) and run down.sh in a trap/finally.
#
# Settings (environment variables, all optional):
#   SLURM_LAB_NODES    number of compute nodes             (default 3)
#   SLURM_LAB_PREFIX   node name prefix -> node1..nodeN    (default node)
#   SLURM_LAB_NET      first three octets of the /24        (default 10.77.0)
#                      bridge/controller = .1, node i = .(10+i)
#   SLURM_LAB_BRIDGE   bridge interface name               (default slbr0)
#   SLURM_LAB_CTL      controller hostname                 (default slurmctl)
#   SLURM_LAB_CPUS     CPUs advertised per node            (default 2)
#   SLURM_LAB_GPUS     fake GPUs advertised per node        (default 8; 0 = none)
#   SLURM_LAB_GPU_TYPES GPU types, e.g. "h100" or "h100 a100": the GPUs of a node
#                      are split evenly among them (typed gres, as "--gpus-per-node=
#                      h100:4" needs)                       (default: untyped)
#   SLURM_LAB_DIR      state/log/spool directory           (default /run/slurm-lab)
#   SLURM_LAB_TIMEOUT  seconds to wait for the nodes idle  (default 60)
#
# What it changes on the machine (down.sh undoes every item):
#   - starts munged if none answers (down.sh stops it only if up.sh started it)
#   - bridge $SLURM_LAB_BRIDGE, veth pairs slh<i>/sln<i>, netns slurmlab-<node>
#   - a "# BEGIN slurm-lab" ... "# END slurm-lab" block in /etc/hosts
#   - /etc/slurm/slurm.conf and /etc/slurm/gres.conf (marked "# slurm-lab");
#     a foreign file is moved aside to <file>.slurm-lab-orig and restored later
#   - everything else lives under $SLURM_LAB_DIR
#
# Pitfalls handled:
#   - nsenter --net, NOT "ip netns exec": the latter remounts /sys and hides
#     /sys/fs/cgroup, and slurmd 22.05 then dies ("Unable to initialize cgroup
#     plugin").
#   - slurmctld refuses to start unless gethostname() == SlurmctldHost: it gets
#     a private UTS namespace instead of renaming the machine.
#   - no default route in the node namespaces: jobs reach only the lab /24 and
#     their own loopback, nothing can leave the machine.
#   - every name a job uses is in /etc/hosts (no DNS queries), and slurm.conf is
#     at the standard path (no "configless" DNS SRV lookups, no SLURM_CONF that
#     could name a missing file and make clients retry for 60 s).
#   - a stale lab (killed session: namespaces, /etc/hosts block, lab.env) or a
#     foreign Slurm daemon makes up.sh refuse instead of half-starting.
#   - side effects outside $SLURM_LAB_DIR are recorded so down.sh can undo them:
#     /run/netns (a bind mount made by "ip netns add"), /run/munge, munged's
#     log and PRNG seed (kept under $SLURM_LAB_DIR instead of /var).
#   - MinJobAge=4, so "sbatch --wait" polls every 2 s instead of 2, 8, 32 s.
# Do not pipe this script into "head": a SIGPIPE kills it half way (down.sh
# cleans that up too).
set -euo pipefail

N=${SLURM_LAB_NODES:-3}
PREFIX=${SLURM_LAB_PREFIX:-node}
NET=${SLURM_LAB_NET:-10.77.0}
BR=${SLURM_LAB_BRIDGE:-slbr0}
CTL=${SLURM_LAB_CTL:-slurmctl}
CPUS=${SLURM_LAB_CPUS:-2}
GPUS=${SLURM_LAB_GPUS:-8}
read -r -a GPU_TYPES <<< "${SLURM_LAB_GPU_TYPES:-}"
BASE=${SLURM_LAB_DIR:-/run/slurm-lab}
TIMEOUT=${SLURM_LAB_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK=slurm-lab

t0=$(date +%s.%N)
log() { printf '[up %6.2fs] %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
die() { echo "up.sh: $*" >&2; exit 1; }

# ------------------------------------------------------------- checks ----
[ "$(id -u)" = 0 ] || die "must run as root"
for b in slurmctld slurmd sinfo scontrol munged munge unmunge runuser ip unshare nsenter setsid; do
  command -v "$b" >/dev/null 2>&1 \
    || die "missing $b (apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)"
done
is_uint() { case $1 in ''|*[!0-9]*) return 1;; esac; }
is_uint "$N" && [ "$N" -ge 1 ] && [ "$N" -le 200 ] || die "SLURM_LAB_NODES must be 1..200, got '$N'"
is_uint "$CPUS" && [ "$CPUS" -ge 1 ] || die "SLURM_LAB_CPUS must be >= 1, got '$CPUS'"
is_uint "$GPUS" && [ "$GPUS" -le 64 ] || die "SLURM_LAB_GPUS must be 0..64, got '$GPUS'"
for t in "${GPU_TYPES[@]}"; do [[ $t =~ ^[a-z][a-z0-9_]*$ ]] || die "SLURM_LAB_GPU_TYPES: '$t' is not a type name"; done
[ ${#GPU_TYPES[@]} = 0 ] || [ $((GPUS % ${#GPU_TYPES[@]})) = 0 ] \
  || die "SLURM_LAB_GPUS=$GPUS cannot be split evenly among the types '${GPU_TYPES[*]}'"
is_uint "$TIMEOUT" || die "SLURM_LAB_TIMEOUT must be an integer, got '$TIMEOUT'"
[[ $NET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "SLURM_LAB_NET must be three octets like 10.77.0, got '$NET'"
[[ $PREFIX =~ ^[a-z][a-z0-9-]*$ ]] || die "SLURM_LAB_PREFIX must match [a-z][a-z0-9-]*, got '$PREFIX'"
[[ $CTL =~ ^[a-z][a-z0-9-]*$ ]] || die "SLURM_LAB_CTL must match [a-z][a-z0-9-]*, got '$CTL'"
[[ $BR =~ ^[A-Za-z0-9_-]{1,15}$ ]] || die "SLURM_LAB_BRIDGE is not a valid interface name: '$BR'"
case $BASE in /*) ;; *) die "SLURM_LAB_DIR must be an absolute path, got '$BASE'";; esac

# A stale or running lab (ours or the reference one): refuse, down.sh first.
stale() { die "$* - run down.sh first"; }
[ -e "$BASE/lab.env" ] && stale "$BASE/lab.env exists (lab already up?)"
ip link show "$BR" >/dev/null 2>&1 && stale "interface $BR already exists"
ip netns list 2>/dev/null | grep -q '^slurmlab-' && stale "slurmlab-* network namespaces exist"
grep -q "# BEGIN $MARK" /etc/hosts && stale "/etc/hosts has a $MARK block"
for f in "$CONF" "$GRES_CONF"; do
  [ -e "$f" ] && grep -q "# $MARK" "$f" && stale "$f was written by the lab"
  [ -e "$f.$MARK-orig" ] && stale "$f.$MARK-orig exists (a lab never restored it)"
done
# Someone else's Slurm daemons would fight over ports 6817/6818 (zombies don't count).
others=$(ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && ($3 == "slurmctld" || $3 == "slurmd" || $3 == "slurmstepd") {print $1}' | tr '\n' ' ')
[ -z "${others// }" ] || die "Slurm daemons already running (pids $others): not ours, refusing to start"

trap 'echo "up.sh failed; run down.sh to clean up (logs: $BASE/log)" >&2' ERR

# Directories that tools create as a side effect (ip netns add: /run/netns as a
# shared bind mount; munged: /run/munge; umount/libmount: /run/mount; us:
# /etc/slurm): note the ones that do not exist yet so down.sh removes them.
created=()
for d in /run/netns /run/munge /run/mount /etc/slurm; do [ -e "$d" ] || created+=("$d"); done
mkdir -p "$BASE"/{state,log,run,spool}
chmod 755 "$BASE"
printf '%s\n' "${created[@]}" > "$BASE/created-dirs"
# Everything down.sh needs, so it works whatever the caller's environment.
cat > "$BASE/lab.env" <<EOF
N=$N
PREFIX=$PREFIX
NET=$NET
BR=$BR
CTL=$CTL
BASE=$BASE
EOF

# -------------------------------------------------------------- munge ----
# One munged serves every namespace: its socket is a path and all namespaces
# share the mount namespace.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already answering: reusing it (down.sh will leave it alone)"
else
  if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    echo /etc/munge/munge.key > "$BASE/created-munge-key"
  fi
  install -d -o munge -g munge -m 755 /run/munge      # the socket: default path
  # Log, PRNG seed and pid file under $BASE, not /var/log/munge, /var/lib/munge.
  install -d -o munge -g munge -m 700 "$BASE/munge"
  runuser -u munge -- /usr/sbin/munged --log-file="$BASE/munge/munged.log" \
    --seed-file="$BASE/munge/munged.seed" --pid-file="$BASE/munge/munged.pid"   # daemonises
  for _ in $(seq 50); do [ -s "$BASE/munge/munged.pid" ] && break; sleep 0.1; done
  cp "$BASE/munge/munged.pid" "$BASE/run/munged.pid"   # "we started it"
  munge -n | unmunge >/dev/null || die "munge self-test failed"
  log "munged started (pid $(tr -dc 0-9 < "$BASE/run/munged.pid"))"
fi

# ------------------------------------------------------------ network ----
ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up
hosts="$NET.1 $CTL"
for i in $(seq 1 "$N"); do
  name=$PREFIX$i ns=slurmlab-$PREFIX$i addr=$NET.$((10 + i))
  ip netns add "$ns"
  ip link add "slh$i" type veth peer name "sln$i"
  ip link set "slh$i" master "$BR"
  ip link set "slh$i" up
  ip link set "sln$i" netns "$ns"
  ip -n "$ns" link set "sln$i" name eth0
  ip -n "$ns" addr add "$addr/24" dev eth0
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  # Deliberately NO default route: nothing can leave the /24.
  hosts+=$'\n'"$addr $name"
done
[ -z "$(tail -c1 /etc/hosts)" ] || echo >> /etc/hosts
printf '# BEGIN %s\n%s\n# END %s\n' "$MARK" "$hosts" "$MARK" >> /etc/hosts
log "network: bridge $BR $NET.1/24, $N namespaces"

# --------------------------------------------------- slurm.conf, gres ----
mkdir -p /etc/slurm
for f in "$CONF" "$GRES_CONF"; do
  [ -e "$f" ] && mv "$f" "$f.$MARK-orig"   # foreign file: down.sh puts it back
done
gres_line="" node_gres=""
if [ "$GPUS" -gt 0 ]; then
  # Fake GPUs: gres/gpu backed by device nodes that are clones of /dev/null.  Slurm schedules them and sets
  # CUDA_VISIBLE_DEVICES in steps; task/none means no cgroup device fencing.
  mkdir -p "$BASE/dev"
  # Character devices (Slurm rejects plain files) that behave like /dev/null.
  for g in $(seq 0 $((GPUS - 1))); do mknod -m 666 "$BASE/dev/nvidia$g" c 1 3; done
  gres_line="GresTypes=gpu"
  printf '# %s - generated by up.sh; removed by down.sh\n' "$MARK" > "$GRES_CONF"
  if [ ${#GPU_TYPES[@]} = 0 ]; then
    node_gres=" Gres=gpu:$GPUS"
    printf 'Name=gpu File=%s/dev/nvidia[0-%d]\n' "$BASE" $((GPUS - 1)) >> "$GRES_CONF"
  else  # typed: GPUs 0.. of the first type, then the next type, ...
    per=$((GPUS / ${#GPU_TYPES[@]})) first=0 node_gres=""
    for t in "${GPU_TYPES[@]}"; do
      node_gres+="${node_gres:+,}gpu:$t:$per"
      printf 'Name=gpu Type=%s File=%s/dev/nvidia[%d-%d]\n' "$t" "$BASE" "$first" $((first + per - 1)) >> "$GRES_CONF"
      first=$((first + per))
    done
    node_gres=" Gres=$node_gres"
  fi
  chmod 644 "$GRES_CONF"
fi
cat > "$CONF" <<EOF
# $MARK - generated by up.sh; removed by down.sh
ClusterName=lab
SlurmctldHost=$CTL($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$BASE/state
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdSpoolDir=$BASE/spool/%n
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=5
# sbatch --wait sleeps 2 s, then 8, then 32 s between polls while its sleep is
# below MinJobAge/2: with MinJobAge=60 a 12-s job returns after 42 s.  With 4 it
# polls every 2 s (records of finished jobs still stay for 4 s at least).
MinJobAge=4
InactiveLimit=0
SlurmdTimeout=60
$gres_line
NodeName=DEFAULT CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=1000$node_gres State=UNKNOWN
EOF
for i in $(seq 1 "$N"); do
  echo "NodeName=$PREFIX$i NodeAddr=$NET.$((10 + i)) NodeHostname=$PREFIX$i" >> "$CONF"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
chmod 644 "$CONF"

# ---------------------------------------------------------- slurmctld ----
# -D foreground (so $! is its pid), -c clear old state, -i ignore state errors.
# In a non-interactive script a background job is no process-group leader, so
# setsid does not fork: $! is the pid that ends up exec'ing slurmctld.
setsid unshare --uts sh -c "hostname $CTL && exec slurmctld -D -c -i -f $CONF" \
  </dev/null >"$BASE/log/slurmctld.out" 2>&1 &
echo $! > "$BASE/run/slurmctld.launcher.pid"
up=0
for _ in $(seq 150); do
  if scontrol ping 2>/dev/null | grep -q 'is UP'; then up=1; break; fi
  kill -0 "$(cat "$BASE/run/slurmctld.launcher.pid")" 2>/dev/null || {
    cat "$BASE/log/slurmctld.out" "$BASE/log/slurmctld.log" >&2 2>/dev/null; die "slurmctld died (log above)"; }
  sleep 0.1
done
[ "$up" = 1 ] || die "slurmctld did not answer within 15 s (logs: $BASE/log)"
log "slurmctld up (pid $(cat "$BASE/run/slurmctld.launcher.pid"))"

# ------------------------------------------------------------- slurmd ----
for i in $(seq 1 "$N"); do
  name=$PREFIX$i
  mkdir -p "$BASE/spool/$name"
  # nsenter, NOT "ip netns exec" (see the header).  Own UTS ns for the hostname.
  setsid nsenter --net="/run/netns/slurmlab-$name" unshare --uts \
    sh -c "hostname $name && exec slurmd -D -N $name -f $CONF" \
    </dev/null >"$BASE/log/slurmd-$name.out" 2>&1 &
  echo $! > "$BASE/run/slurmd-$name.launcher.pid"
done
log "started $N slurmd"

# ------------------------------------------------------ wait for idle ----
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$N" ] && break
  for i in $(seq 1 "$N"); do
    kill -0 "$(cat "$BASE/run/slurmd-$PREFIX$i.launcher.pid")" 2>/dev/null || {
      cat "$BASE/log/slurmd-$PREFIX$i.out" "$BASE/log/slurmd-$PREFIX$i.log" >&2 2>/dev/null
      die "slurmd $PREFIX$i died (log above)"; }
  done
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true
    die "nodes not idle after ${TIMEOUT}s; logs in $BASE/log"
  fi
  sleep 0.2
done
log "all $N nodes idle ($CPUS CPUs, $GPUS GPUs each${GPU_TYPES[0]:+: ${GPU_TYPES[*]}})"
sinfo
