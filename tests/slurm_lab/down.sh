#!/bin/bash
# tests/slurm_lab/down.sh - tear down what up.sh built and leave the machine as
# up.sh found it.  Safe to run any number of times: with no lab, after a
# half-failed up.sh, after the daemons were SIGKILLed, or after a killed session
# left namespaces and the /etc/hosts block behind.
#
# It ends only processes the lab started, by pid: the pids in its pid files
# (checked against their command name, against pid reuse), a slurmctld whose
# command line is exactly up.sh's and whose private hostname is the lab's
# controller name, and every pid inside the lab's network namespaces (slurmd,
# slurmstepd and the job processes).  munged is stopped only if up.sh started it.
# Zombies count as gone: PID 1 of some VMs reaps orphans lazily, and a zombie
# has already exited.  Jobs are scancelled first, while slurmctld still runs.
#
# Reads the settings up.sh saved in $SLURM_LAB_DIR/lab.env; the SLURM_LAB_*
# variables (see up.sh) are the fallback when that file is gone.
# Exit status: 0 when the machine is clean afterwards, 1 otherwise.
set -uo pipefail

BASE=${SLURM_LAB_DIR:-/run/slurm-lab}
NET=${SLURM_LAB_NET:-10.77.0}
BR=${SLURM_LAB_BRIDGE:-slbr0}
CTL=${SLURM_LAB_CTL:-slurmctl}
# shellcheck disable=SC1091
[ -r "$BASE/lab.env" ] && . "$BASE/lab.env"
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
MARK=slurm-lab

[ "$(id -u)" = 0 ] || { echo "down.sh: must run as root" >&2; exit 1; }
t0=$(date +%s.%N)
log() { printf '[down %6.2fs] %s\n' "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$*"; }
warn() { echo "down.sh: $*" >&2; }

# comm_is PID NAME...: alive, not a zombie, and its command name is one of NAME
comm_is() {
  local pid=$1 c st n; shift
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  c=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  st=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
  [ "$st" != Z ] || return 1
  for n in "$@"; do [ "$c" = "$n" ] && return 0; done
  return 1
}
# alive PID: exists and is not a zombie (PID 1 may reap orphans lazily)
alive() {
  local st
  st=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
# stop PID...: SIGTERM, wait up to 6 s, then SIGKILL and wait up to 2 s more
stop() {
  local p left i
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null
  for i in $(seq 80); do
    left=()
    for p in "$@"; do alive "$p" && left+=("$p"); done
    [ ${#left[@]} = 0 ] && return 0
    [ "$i" = 60 ] && { warn "SIGKILL to ${left[*]}"; kill -KILL "${left[@]}" 2>/dev/null; }
    sleep 0.1
  done
  warn "still alive: ${left[*]}"
}
pidfile() { [ -r "$1" ] && tr -dc '0-9' < "$1"; }
lab_conf() { [ -r "$1" ] && grep -q "# $MARK" "$1"; }
ns_list() { ip netns list 2>/dev/null | awk '{print $1}' | grep '^slurmlab-' ; }
ns_pids() { local ns; for ns in $(ns_list); do ip netns pids "$ns" 2>/dev/null; done | sort -un; }

# 1. Cancel jobs while the controller still runs, so slurmstepd cleans up.
if lab_conf "$CONF" && timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    # shellcheck disable=SC2086
    timeout 5 scancel $jobs 2>/dev/null
    for _ in $(seq 50); do
      [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.1
    done
    log "cancelled jobs: $jobs"
  fi
fi

# 2. The daemons and everything left in the node namespaces, all at once.
pids=()
for f in "$BASE"/run/slurmd-*.pid; do
  p=$(pidfile "$f"); comm_is "$p" slurmd && pids+=("$p")
done
for f in "$BASE/run/slurmctld.pid" "$BASE/run/slurmctld.launcher.pid"; do
  p=$(pidfile "$f"); comm_is "$p" slurmctld && pids+=("$p")
done
# A slurmctld whose pid files are gone (state dir removed): recognise it by
# up.sh's exact command line and by the private hostname up.sh gave it.
for p in $(ps -eo pid=,comm= | awk '$2 == "slurmctld" {print $1}'); do
  comm_is "$p" slurmctld || continue
  [ "$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)" = "slurmctld -D -c -i -f $CONF " ] || continue
  [ "$(nsenter -t "$p" -u hostname 2>/dev/null)" = "$CTL" ] && pids+=("$p")
done
mapfile -t nsp < <(ns_pids)
[ ${#nsp[@]} -gt 0 ] && log "ending ${#nsp[@]} processes in the node namespaces"
mapfile -t pids < <(printf '%s\n' "${pids[@]}" "${nsp[@]}" | grep . | sort -un)
stop "${pids[@]}"
mapfile -t nsp < <(ns_pids)   # anything forked meanwhile
stop "${nsp[@]}"
log "slurmctld, slurmd and job processes stopped"

# 3. munged, only if up.sh started it.
p=$(pidfile "$BASE/run/munged.pid")
if comm_is "$p" munged; then stop "$p"; log "munged stopped"; fi

# 4. Network.  Deleting a netns destroys its veth end, which destroys the peer.
for ns in $(ns_list); do ip netns del "$ns" || warn "cannot delete netns $ns"; done
for l in $(ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^sl[hn][0-9]+$'); do
  ip link del "$l" 2>/dev/null
done
if ip link show "$BR" >/dev/null 2>&1; then
  if [ -r "$BASE/lab.env" ] || ip -o addr show dev "$BR" 2>/dev/null | grep -q " $NET\.1/24 "; then
    ip link del "$BR" || warn "cannot delete bridge $BR"
  else
    warn "leaving interface $BR alone: not the lab's (no $BASE/lab.env, no $NET.1/24 on it)"
  fi
fi
log "network removed"

# 5. Files: /etc/hosts block, generated configs (and the foreign ones restored).
if grep -q "# BEGIN $MARK" /etc/hosts; then
  # Rewrite in place (no sed -i, no $(...) that eats trailing newlines):
  # /etc/hosts may be a bind mount, and every other byte must stay as it was.
  tmp=$(mktemp) && sed "/^# BEGIN $MARK\$/,/^# END $MARK\$/d" /etc/hosts > "$tmp" \
    && cat "$tmp" > /etc/hosts; rm -f "$tmp"
fi
for f in "$CONF" "$GRES_CONF"; do
  lab_conf "$f" && rm -f "$f"
  if [ -e "$f.$MARK-orig" ]; then
    if [ -e "$f" ]; then warn "both $f and $f.$MARK-orig exist: leaving both"
    else mv "$f.$MARK-orig" "$f" && log "restored the original $f"; fi
  fi
done
if [ -r "$BASE/created-munge-key" ]; then rm -f /etc/munge/munge.key; fi
if [ -r "$BASE/created-dirs" ]; then
  while read -r d; do
    case $d in
      /run/netns) mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ] && umount /run/netns
                  rmdir /run/netns 2>/dev/null ;;
      /run/munge)  # a SIGKILLed munged leaves its socket: remove it if no munged runs
                  ps -eo stat=,comm= | awk '$1 !~ /^Z/ && $2 == "munged" {f=1} END {exit !f}' \
                    || rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
                  rmdir /run/munge 2>/dev/null ;;
      /run/mount|'') ;;                 # last: umount above may create it
      *) rmdir "$d" 2>/dev/null ;;
    esac
  done < "$BASE/created-dirs"
  grep -qx /run/mount "$BASE/created-dirs" && { rm -f /run/mount/utab /run/mount/utab.lock; rmdir /run/mount 2>/dev/null; }
fi
case $BASE in /?*) rm -rf "$BASE" ;; esac
log "files removed"

# 6. Verify (report only).
bad=0
leftover=$(ns_pids | tr '\n' ' ')
[ -z "${leftover// }" ] || { warn "processes left in the lab namespaces: $leftover"; bad=1; }
[ -z "$(ns_list)" ] || { warn "namespaces left: $(ns_list | tr '\n' ' ')"; bad=1; }
! grep -q "# BEGIN $MARK" /etc/hosts || { warn "/etc/hosts block left"; bad=1; }
! lab_conf "$CONF" || { warn "$CONF left"; bad=1; }
ip -o addr 2>/dev/null | grep -q " $NET\.1/24 " && { warn "$NET.1/24 still configured"; bad=1; }
daemons=$(ps -eo pid=,stat=,comm= | awk '$2 !~ /^Z/ && $3 ~ /^(slurmctld|slurmd|slurmstepd)$/ {print $1}' | tr '\n' ' ')
[ -z "${daemons// }" ] || { warn "Slurm processes still running (pids $daemons)"; bad=1; }
[ $bad = 0 ] && log "clean"
exit $bad
