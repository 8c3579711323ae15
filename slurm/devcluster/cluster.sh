#!/usr/bin/env bash
# A real SLURM cluster on this machine, for development and CI: one compute node, or N compute
# "hosts" (each a slurmd in its own network, UTS and mount namespace) on a private bridge.
#
#   slurm/devcluster/cluster.sh COMMAND
#
#   install   install the Debian packages if missing (root; fast no-op when present)
#   start [--nodes N]
#             install if needed, then start munged, MariaDB, slurmdbd, slurmctld and the slurmd(s)
#             and wait until a job runs (a probe job, "cluster-ready"); prints `export SLURM_CONF=...`
#             on stdout, progress on stderr, so eval "$(slurm/devcluster/cluster.sh start)" works.
#             N=1 (the default): one node named after this machine, everything on 127.0.0.1.
#             N>1: hosts node1..nodeN (see "Several nodes" below). A cluster that is up with another
#             N is stopped and started again with this one; leftovers of a crashed cluster
#             (namespaces, links, stray slurmd) are removed first.
#   stop      cancel the cluster's jobs (running ones get 3 s to end on their own), stop the
#             daemons, wait for them to exit; remove the nodes' namespaces, links and bridge
#   status    say which daemons run (one slurmd per node), print sinfo (exit 0 all up, 3 otherwise)
#   env       print `export SLURM_CONF=...`:  eval "$(slurm/devcluster/cluster.sh env)"
#   slurmd NODE
#             start NODE's slurmd again if it is not running (it crashed, or was killed); its
#             running job steps carry on (the chaos soak, tests/chaos.py, kills slurmds)
#
# The daemons' config files are written on every start from templates/*.in beside this script
# (slurm.conf, slurmdbd.conf, my.cnf), with this machine's host name, hardware, ports and folders
# filled in.
#
# Why a real cluster and not a mock: the launcher's tests must see what sbatch, slurmctld,
# sacct and submitit really do (states, requeue, cancel). Why slurmdbd + MariaDB: without
# accounting, `sacct` fails, submitit reports every job as UNKNOWN and never sees a cancelled
# job as done, so `result()` blocks forever.
#
# Everything (configs, munge key and socket, MariaDB datadir and socket, slurm state, spool, logs,
# pid files) lives under one folder outside the checkout: $SLURM_ROOT, default
# /tmp/cifar-infinity-slurm. Nothing is written to /etc or /var (except the named network
# namespaces `ip netns` keeps under /var/run/netns while N>1 nodes run). There is no init system here
# (package post-install scripts say "policy-rc.d denied execution of start": expected), so every
# daemon is started by hand and stopped through its pid file. PID 1 on these machines reaps
# orphans lazily: right after `stop`, `pgrep` may still list the daemons as <defunct> for a few
# seconds; they are no longer running.
#
# State survives stop/start: the munge key, the accounting database (job history) and slurmctld's
# state are kept; `stop` cancels jobs that are still queued or running so that no job process
# outlives the cluster and a later start begins with an empty queue. To reset everything:
# `slurm/devcluster/cluster.sh stop && rm -rf "$SLURM_ROOT"`.
#
# Several nodes (start --nodes N, N>1), as ../shared/docs/multinode-slurm.md describes: a bridge
# in this (root) namespace holds the controller's address 169.254.100.1/24; node I is a network
# namespace with a veth `eth0` on that bridge at 169.254.100.(10+I), where its slurmd runs with host
# name nodeI and a private mount of a hosts file (the machine's, plus every node and the
# controller) over /etc/hosts, so node names resolve, forwards and backwards, inside jobs. Job steps
# inherit their slurmd's namespaces: a task on nodeI sees host name nodeI and its own eth0, and
# the same file system, as on a cluster with a shared file system; a file system mounted under
# $SLURM_ROOT/mnt while the cluster runs is seen by every node too (shared_mount_up). Each node
# gets 1/N of the cores (at least one) and of the memory. Link-local addresses on a private
# bridge are routed nowhere: nothing leaves the machine. MariaDB, slurmdbd and slurmctld stay in
# the root namespace.
# Only one multi-node cluster per machine (the subnet is fixed); the names of its namespaces and
# links carry SLURM_PORT_BASE, so another cluster's start or stop never touches them.
#
# Environment knobs:
#   SLURM_ROOT           root folder (default /tmp/cifar-infinity-slurm)
#   SLURM_PORT_BASE      slurmctld=BASE, slurmd=BASE+1, slurmdbd=BASE+2, MariaDB=BASE+3
#                        (default 6817: the SLURM defaults 6817/6818/6819, MariaDB on 6820 so it
#                        never collides with a system MariaDB on 3306)
#   SLURM_READY_TIMEOUT  seconds each readiness check may take (default 60)
set -euo pipefail

# gettext-base: envsubst, which fills in the config templates. iproute2 (ip) and util-linux
# (nsenter, unshare): the namespaces and links of a multi-node cluster.
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server gettext-base iproute2 util-linux)
CLUSTER_NAME=cifar            # lowercase, no '-': it prefixes the accounting tables in MariaDB
PARTITION=debug
MAX_NODES=50                  # node I's address is 169.254.100.(10+I)

ROOT=$(realpath -m "${SLURM_ROOT:-/tmp/cifar-infinity-slurm}")
PORT_BASE=${SLURM_PORT_BASE:-6817}
READY_TIMEOUT=${SLURM_READY_TIMEOUT:-60}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

ETC=$ROOT/etc
TEMPLATES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/templates
MUNGE_DIR=$ROOT/munge              # 0755: munged wants it searchable by all, writable by no other
MUNGE_SOCK=$MUNGE_DIR/munge.socket
MUNGE_KEY=$MUNGE_DIR/munge.key     # 0600: munged refuses a key readable by others
DB_DIR=$ROOT/mariadb
DB_DATA=$DB_DIR/data
DB_SOCK=$DB_DIR/mariadb.sock
DB_PASS_FILE=$DB_DIR/slurm.pass
STATE=$ROOT/state                  # slurmctld StateSaveLocation
SPOOL=$ROOT/spool                  # slurmd SlurmdSpoolDir (slurmstepd sockets); one subfolder per node when N>1
LOG=$ROOT/log
RUN=$ROOT/run                      # pid files
NODES_FILE=$ETC/nodes              # how many nodes the last start asked for
HOSTS_FILE=$ETC/hosts              # the nodes' /etc/hosts (N>1)
SHARED_MNT=$ROOT/mnt               # N>1: what is mounted under it later, every node sees too

# The multi-node network. Interface names are at most 15 characters: "s6817br", "s6817v12".
SUBNET=169.254.100
CTLD_NET_ADDR=$SUBNET.1
BRIDGE=s${PORT_BASE}br
VETH_PREFIX=s${PORT_BASE}v         # + I: the root-namespace end of node I's veth pair
NS_PREFIX=slurm${PORT_BASE}-       # + nodeI: node I's network namespace

# Every slurm command below (and every command a user runs against this cluster) must find this
# config; exported here so sinfo/scontrol/sacctmgr/scancel and the daemons all use it.
export SLURM_CONF=$ETC/slurm.conf

# name:pidfile, in start order; stop goes in reverse. The slurmd(s) come after these (one per node).
DAEMONS=(
    "munged:$MUNGE_DIR/munged.pid"
    "mariadbd:$DB_DIR/mariadbd.pid"
    "slurmdbd:$RUN/slurmdbd.pid"
    "slurmctld:$RUN/slurmctld.pid"
)

say() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

# --- nodes ---------------------------------------------------------------------------------------

# The node count the cluster was last started with (1 if it never was).
recorded_nodes() {
    local n
    n=$(cat "$NODES_FILE" 2>/dev/null || true)
    [[ $n =~ ^[1-9][0-9]*$ ]] && echo "$n" || echo 1
}

node_names() {  # N: the compute nodes' names
    local i
    if (($1 == 1)); then
        hostname -s
    else
        for ((i = 1; i <= $1; i++)); do echo "node$i"; done
    fi
}

# One node's slurmd pid file; SLURM writes it where slurm.conf's SlurmdPidFile says (%n = node).
slurmd_pidfile() {  # N NODE
    if (($1 == 1)); then echo "$RUN/slurmd.pid"; else echo "$RUN/slurmd-$2.pid"; fi
}
slurmd_log() {  # N NODE
    if (($1 == 1)); then echo "$LOG/slurmd.log"; else echo "$LOG/slurmd-$2.log"; fi
}

# --- processes -----------------------------------------------------------------------------------

# The pid a pid file names, if that process is alive and is the expected program. Checking the
# program name guards against a stale pid file whose pid was reused. A zombie counts as dead: PID 1
# on this kind of machine does not always reap orphans.
live_pid() {  # NAME PIDFILE
    local name=$1 file=$2 pid
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) != Z ]] || return 1
    echo "$pid"
}

pid_gone() {  # PID: true once the process has exited (or is a zombie)
    [[ ! -e /proc/$1 ]] || [[ $(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) == Z ]]
}

# Send SIGNAL to PID and wait up to TENTHS tenths of a second for it to be gone.
signal_and_wait() {  # SIGNAL PID TENTHS
    local i
    kill "-$1" "$2" 2>/dev/null || true
    for ((i = 0; i < $3; i++)); do
        pid_gone "$2" && return 0
        sleep 0.1
    done
    return 1
}

# Wait for a process to exit: SIGTERM, then SIGKILL after 20 s.
stop_pid() {  # NAME PID
    local name=$1 pid=$2
    signal_and_wait TERM "$pid" 200 && return 0
    say "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
    signal_and_wait KILL "$pid" 50 && return 0
    die "$name (pid $pid) does not exit"
}

# Poll COMMAND... until it succeeds, for at most READY_TIMEOUT seconds; on timeout show LOGFILE.
wait_for() {  # WHAT LOGFILE COMMAND...
    local what=$1 logfile=$2 deadline=$((SECONDS + READY_TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "$what not ready after ${READY_TIMEOUT}s; last lines of $logfile:"
            tail -n 15 "$logfile" >&2 2>/dev/null || true
            die "$what did not become ready"
        fi
        sleep 0.2
    done
}

port_free() {  # PORT: true if nothing accepts connections on 127.0.0.1:PORT
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# This cluster's processes named NAME (slurmd, slurmstepd), found by the SLURM_CONF they inherit
# from this script, with or without a pid file: a crashed cluster's slurmd left its pid file behind
# or lost it.
cluster_procs() {  # NAME
    local pid
    for pid in $(pgrep -x "$1" || true); do
        # (The process may end while we look: silence the shell's own redirection error too.)
        if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF"; then
            pid_gone "$pid" || echo "$pid"
        fi
    done
}

# --- install -------------------------------------------------------------------------------------

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || echo "$p"
    done
}

cmd_install() {
    local missing
    missing=$(missing_packages)
    if [[ -z $missing ]]; then
        say "packages present: ${PACKAGES[*]}"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "installing ${missing//$'\n'/ } needs root"
    say "installing: ${missing//$'\n'/ }"
    # No recommends: the full set pulls in about 35 more plugin packages the cluster never uses.
    # Retry once after `apt-get update` in case the package lists are missing or stale.
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2; then
        apt-get update -q >&2
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2
    fi
    [[ -z $(missing_packages) ]] || die "packages still missing after apt-get: $(missing_packages | xargs)"
}

# --- configuration -------------------------------------------------------------------------------

# fill NAME: writes $ETC/NAME from templates/NAME.in, every ${VAR} it names taken from this
# script's variables. Each must be set: a typo must not become an empty setting.
fill() {
    local name=$1 vars var
    vars=$(grep -o '\${[A-Z_]*}' "$TEMPLATES/$name.in" | sort -u | tr -d '${}')
    (
        for var in $vars; do
            [[ -n ${!var:-} ]] || die "templates/$name.in names \${$var}, which cluster.sh does not set"
            export "${var?}"
        done
        envsubst "$(printf '${%s} ' $vars)" <"$TEMPLATES/$name.in" >"$ETC/$name.tmp"
    )
    mv "$ETC/$name.tmp" "$ETC/$name"
}

write_configs() {  # N
    local n=$1 hw field mem_kb i cpus mem HOST CPUS BOARDS SOCKETS CORES THREADS REAL_MEM DB_PASS
    local CTLD_ADDR COMM_PARAMS NODE_LINES SLURMD_SPOOL SLURMD_PIDFILE SLURMD_LOGFILE
    HOST=$(hostname -s)
    hw=$(slurmd -C | head -n 1)
    for field in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore; do
        [[ $hw =~ (^| )$field=([0-9]+) ]] || die "slurmd -C gave no $field: $hw"
        printf -v "hw_$field" '%s' "${BASH_REMATCH[2]}"
    done
    # shellcheck disable=SC2154
    CPUS=$hw_CPUs BOARDS=$hw_Boards SOCKETS=$hw_SocketsPerBoard CORES=$hw_CoresPerSocket THREADS=$hw_ThreadsPerCore
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    REAL_MEM=$((mem_kb * 9 / 10 / 1024))
    DB_PASS=$(cat "$DB_PASS_FILE")
    if ((n == 1)); then
        # Everything on the loopback address: the host name need not resolve, nothing listens outside.
        # The hardware as `slurmd -C` reports it: CPUs alone makes slurmd complain that the node
        # "reconfigured socket/core boundaries".
        CTLD_ADDR=127.0.0.1 COMM_PARAMS=NoInAddrAny,NoCtldInAddrAny
        NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS"
        NODE_LINES+=" CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REAL_MEM State=UNKNOWN"
        SLURMD_SPOOL=$SPOOL SLURMD_PIDFILE=$RUN/slurmd.pid SLURMD_LOGFILE=$LOG/slurmd.log
    else
        # A share of the machine per node. Every slurmd still detects the whole machine;
        # SlurmdParameters=config_overrides (in the template) makes it register what this line
        # says instead, so a node with fewer CPUs than the machine is not drained for it.
        CTLD_ADDR=$CTLD_NET_ADDR COMM_PARAMS=NoCtldInAddrAny
        cpus=$((CPUS / n > 0 ? CPUS / n : 1))
        mem=$((REAL_MEM / n))
        ((CPUS >= n)) || say "warning: $n nodes on $CPUS CPUs: each node gets 1 CPU (the cores are overcommitted)"
        NODE_LINES=""
        for ((i = 1; i <= n; i++)); do
            NODE_LINES+="NodeName=node$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$cpus Boards=1 SocketsPerBoard=1"
            NODE_LINES+=" CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"$'\n'
        done
        NODE_LINES=${NODE_LINES%$'\n'}
        # One path in slurm.conf for every slurmd; SLURM puts each node's name in for %n.
        SLURMD_SPOOL=$SPOOL/%n SLURMD_PIDFILE=$RUN/slurmd-%n.pid SLURMD_LOGFILE=$LOG/slurmd-%n.log
    fi
    fill slurm.conf
    (umask 077; fill slurmdbd.conf)
    fill my.cnf
}

make_folders() {
    mkdir -p "$ROOT" "$ETC" "$DB_DIR" "$STATE" "$SPOOL" "$LOG" "$RUN"
    mkdir -p "$MUNGE_DIR"
    # munged refuses a socket folder that others may write to or may not search.
    chmod 755 "$ROOT" "$MUNGE_DIR"
    chmod 700 "$DB_DIR"
    # A unix socket path is limited to 107 bytes.
    local sock
    for sock in "$MUNGE_SOCK" "$DB_SOCK"; do
        ((${#sock} < 100)) || die "SLURM_ROOT is too long for a socket path: $sock"
    done
    if [[ ! -s $MUNGE_KEY ]]; then
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chmod 600 "$MUNGE_KEY"
    if [[ ! -s $DB_PASS_FILE ]]; then
        (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
    fi
}

# --- network (N>1) -------------------------------------------------------------------------------

# The nodes' /etc/hosts: the machine's lines, less those naming this machine (inside a node,
# 127.0.0.1 is the node's own loopback), then the controller and every node, so that node names
# resolve and every address resolves back to its name. c10d looks up the name of each peer that
# connects to its dual-stack listening socket, where an IPv4 peer has the IPv4-mapped IPv6 address
# (::ffff:169.254.100.12); without those lines too the lookup goes to DNS, which no node can reach,
# and c10d warns "The hostname of the client socket cannot be retrieved".
write_hosts() {  # N
    local i host
    host=$(hostname -s)
    {
        echo "# written by slurm/devcluster/cluster.sh; bind-mounted over /etc/hosts inside each node"
        awk -v h="$host" '{ for (f = 2; f <= NF; f++) if ($f == h || $f ~ "^" h "\\.") next; print }' /etc/hosts
        echo "$CTLD_NET_ADDR $host"
        for ((i = 1; i <= $1; i++)); do echo "$SUBNET.$((10 + i)) node$i"; done
        echo "::ffff:$CTLD_NET_ADDR $host"
        for ((i = 1; i <= $1; i++)); do echo "::ffff:$SUBNET.$((10 + i)) node$i"; done
    } >"$HOSTS_FILE.tmp"
    mv "$HOSTS_FILE.tmp" "$HOSTS_FILE"
}

net_up() {  # N
    local i ns
    ip link add "$BRIDGE" type bridge
    ip addr add "$CTLD_NET_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= $1; i++)); do
        ns=${NS_PREFIX}node$i
        ip netns add "$ns"
        ip link add "$VETH_PREFIX$i" type veth peer name eth0 netns "$ns"
        ip link set "$VETH_PREFIX$i" master "$BRIDGE" up
        ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

# $SHARED_MNT, for N>1: a folder bind-mounted on itself and made a shared mount before the
# slurmds start, so that a file system mounted under it later (the chaos soak's small tmpfs,
# tests/chaos.py) is seen by every node, as a cluster's shared file system is. Each node has a
# private mount namespace (its /etc/hosts): a mount made anywhere else after the start stays out
# of the nodes' sight.
shared_mount_up() {
    mkdir -p "$SHARED_MNT"
    mountpoint -q "$SHARED_MNT" || mount --bind "$SHARED_MNT" "$SHARED_MNT"
    mount --make-shared "$SHARED_MNT"
}

shared_mount_down() {  # what is mounted under it too; a busy one is detached (umount -l)
    if mountpoint -q "$SHARED_MNT" 2>/dev/null; then
        umount -R "$SHARED_MNT" 2>/dev/null || umount -R -l "$SHARED_MNT"
    fi
}

# This cluster's namespaces, including those of a previous start with another N.
cluster_namespaces() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${NS_PREFIX}node[0-9]+$" || true
}

# Ends what is left in the nodes' namespaces (job processes whose slurmstepd is gone), then
# removes the veths, the namespaces and the bridge. Safe to run when none of them exist.
net_down() {
    local ns pid link
    for ns in $(cluster_namespaces); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            say "stopping leftover process $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) in $ns"
            signal_and_wait TERM "$pid" 30 || signal_and_wait KILL "$pid" 50 || die "process $pid in $ns does not exit"
        done
    done
    # Deleting one end of a veth pair deletes the other. Deleting a namespace deletes its end too,
    # but the kernel does that later, asynchronously: the veths go first, and one already gone is fine.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${VETH_PREFIX}[0-9]+$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    for ns in $(cluster_namespaces); do
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

# --- start ---------------------------------------------------------------------------------------

slurmds_running() {  # N: every node's slurmd is alive
    local node
    for node in $(node_names "$1"); do
        live_pid slurmd "$(slurmd_pidfile "$1" "$node")" >/dev/null || return 1
    done
}

all_running() {  # N
    local entry
    for entry in "${DAEMONS[@]}"; do
        live_pid "${entry%%:*}" "${entry#*:}" >/dev/null || return 1
    done
    slurmds_running "$1"
}

# Anything of this cluster still there: a daemon, a slurmd or slurmstepd, a namespace, the bridge.
anything_left() {
    local entry
    for entry in "${DAEMONS[@]}"; do
        live_pid "${entry%%:*}" "${entry#*:}" >/dev/null && return 0
    done
    [[ -n $(cluster_procs slurmd)$(cluster_procs slurmstepd)$(cluster_namespaces) ]] && return 0
    ip link show "$BRIDGE" >/dev/null 2>&1
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
mariadb_ok() { mariadb-admin --no-defaults -S "$DB_SOCK" -u root ping; }
dbd_ok() { sacctmgr -n list cluster; }
# Every node accepts work: idle, or busy with jobs (it may hold jobs from before a restart).
nodes_ok() {  # N
    [[ $(sinfo -h -N -o '%N %T' 2>/dev/null | grep -Ec ' (idle|mixed|allocated)$') -ge $1 ]]
}

start_munged() {
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    munged --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for "munged" "$LOG/munged.log" munge_ok
}
start_mariadb() {
    if [[ ! -d $DB_DATA/mysql ]]; then
        say "initialising MariaDB in $DB_DATA"
        rm -rf "$DB_DATA"
        mariadb-install-db --no-defaults --datadir="$DB_DATA" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 ||
            { tail -n 15 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    rm -f "$DB_SOCK"
    # mariadbd stays in the foreground: detach it into its own session so it outlives this shell.
    setsid mariadbd --defaults-file="$ETC/my.cnf" </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for "MariaDB" "$LOG/mariadb.log" mariadb_ok
    # slurmdbd connects over TCP as 'slurm'; it creates the slurm_acct_db database itself.
    local pass
    pass=$(cat "$DB_PASS_FILE")
    mariadb --no-defaults -S "$DB_SOCK" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    slurmdbd  # forks and writes its pid file
    wait_for "slurmdbd" "$LOG/slurmdbd.log" dbd_ok
    # Register the cluster before slurmctld connects, so its jobs are recorded from the start.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
}

start_slurmctld() {  # N
    if (($1 == 1)); then
        slurmctld  # forks; keeps jobs and node state from $STATE
    else
        # With NoCtldInAddrAny slurmctld listens on the address its host name resolves to, which in
        # this namespace's /etc/hosts is 127.0.0.1, out of the nodes' reach. In a mount namespace of
        # its own it sees the nodes' hosts file, where the name is the bridge's address.
        unshare --mount --propagation private \
            sh -c 'mount --bind "$1" /etc/hosts && exec slurmctld' sh "$HOSTS_FILE"
    fi
    wait_for "slurmctld" "$LOG/slurmctld.log" ctld_up
}

start_slurmds() {  # N
    local n=$1 i log=$LOG/slurmd.log
    if ((n == 1)); then
        slurmd  # forks
    else
        log=$LOG/slurmd-node1.log
        for ((i = 1; i <= n; i++)); do
            start_node_slurmd "node$i"
        done
    fi
    wait_for "slurmd (all $n node(s) idle)" "$log" nodes_ok "$n"
}

start_node_slurmd() {  # NODE (of a cluster of several nodes)
    mkdir -p "$SPOOL/$1"
    # nsenter, not `ip netns exec`: that remounts /sys for the namespace, which hides
    # /sys/fs/cgroup, and slurmd then fails to start. The UTS and mount namespaces are the
    # node's own: its host name, and the hosts file over /etc/hosts. slurmd forks and the
    # daemon keeps the namespaces alive; its job steps inherit them.
    # --propagation slave: the node's copy of $SHARED_MNT (a shared mount) receives what is
    # mounted under it afterwards; every other mount, private here, stays as it was.
    nsenter --net="/var/run/netns/${NS_PREFIX}$1" \
        unshare --uts --mount --propagation slave \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd' sh "$1" "$HOSTS_FILE"
}

# A node's slurmd back after it died (a crash, or the chaos soak's SIGKILL: tests/chaos.py). The
# job steps it started run on without it (each has its own slurmstepd); the new slurmd finds them
# in the node's spool and reports them again, so a node back within SlurmdTimeout loses no job.
cmd_slurmd() {  # NODE
    local n node=$1 pid
    n=$(recorded_nodes)
    node_names "$n" | grep -qx "$node" || die "slurmd: no node '$node' in this cluster (nodes: $(node_names "$n" | xargs))"
    if pid=$(live_pid slurmd "$(slurmd_pidfile "$n" "$node")"); then
        say "slurmd $node runs already (pid $pid)"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "slurmd needs root (the daemons run as root)"
    if ((n == 1)); then slurmd; else start_node_slurmd "$node"; fi
    wait_for "slurmd $node" "$(slurmd_log "$n" "$node")" live_pid slurmd "$(slurmd_pidfile "$n" "$node")"
    say "slurmd $node started (pid $(live_pid slurmd "$(slurmd_pidfile "$n" "$node")"))"
}

# For about 3 s after it starts, slurmctld leaves batch jobs pending (its first scheduling pass
# comes late; srun allocations are not delayed). Run one tiny batch job to the end here, so that
# the cluster `start` hands over runs the next job at once, and so that accounting is checked end
# to end (sacct must report the job COMPLETED). It shows in sacct as "cluster-ready". On several
# nodes it spans them all, so every node has run a job step.
probe_done() { [[ $(sacct -n -X -P -j "$1" -o State 2>/dev/null) == COMPLETED ]]; }

probe_job() {  # N
    local t0=$SECONDS jid
    jid=$(sbatch --parsable --job-name=cluster-ready --partition="$PARTITION" --time=1 --nodes="$1" \
        --ntasks-per-node=1 --output=/dev/null --wrap="srun true") || die "sbatch of the probe job failed"
    wait_for "probe job $jid" "$LOG/slurmctld.log" probe_done "$jid"
    say "probe job $jid ran ($((SECONDS - t0)) s)"
}

# `stop` leaves the queue empty; jobs in slurmctld's saved state at start belong to a cluster that
# ended without it (a crash, or a stop whose controller was already dead). Their processes are gone
# (stop ended them); cancelled now, they clear once the nodes register, instead of holding nodes.
cancel_crash_leftovers() {
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | xargs)
    if [[ -n $jobs ]]; then
        say "cancelling jobs left by a cluster that was not stopped: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
    fi
}

cmd_start() {  # N
    local n=$1 t0=$SECONDS used
    if [[ -n $(missing_packages) ]]; then
        cmd_install
    fi
    if [[ $(recorded_nodes) == "$n" ]] && all_running "$n" && ctld_up && nodes_ok "$n"; then
        say "cluster is already up with $n node(s) (SLURM_ROOT=$ROOT); nothing to do"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "start needs root (the daemons run as root)"
    if anything_left; then
        say "a cluster (or what is left of one) is there; stopping it to start cleanly with $n node(s)"
        cmd_stop
    fi
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
        port_free "$port" || die "port $port on 127.0.0.1 is in use by another program; set SLURM_PORT_BASE"
    done

    make_folders
    echo "$n" >"$NODES_FILE"
    write_configs "$n"
    if ((n > 1)); then
        # Before slurmctld: it listens on the bridge's address only.
        # Two bridges with this subnet would route the nodes' replies to the wrong one.
        used=$(ip -o -4 addr show to "$SUBNET.0/24" 2>/dev/null | awk '{print $2}' | xargs)
        [[ -z $used ]] || die "$SUBNET.0/24 is already used by link(s) $used (another multi-node cluster? stop it first)"
        write_hosts "$n"
        net_up "$n"
        shared_mount_up
        say "bridge $BRIDGE ($CTLD_NET_ADDR/24) and $n node namespaces up"
    fi
    # Plain calls, not `f && say`: bash ignores `set -e` inside a function called from an && list.
    start_munged
    say "munged up"
    start_mariadb
    say "MariaDB up (127.0.0.1:$DB_PORT)"
    start_slurmdbd
    say "slurmdbd up (127.0.0.1:$DBD_PORT)"
    start_slurmctld "$n"
    say "slurmctld up ($( ((n == 1)) && echo 127.0.0.1 || echo "$CTLD_NET_ADDR"):$CTLD_PORT)"
    cancel_crash_leftovers
    start_slurmds "$n"
    say "slurmd up; partition $PARTITION: $(sinfo -h -o '%D node(s), %c CPUs, %m MB, %T')"
    probe_job "$n"
    say "cluster up in $((SECONDS - t0)) s; for slurm commands and submitit:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# --- stop ----------------------------------------------------------------------------------------

# Job ids in the given states (squeue -t syntax).
jobs_in() { squeue -h -t "$1" -o %A 2>/dev/null | xargs; }

wait_jobs_gone() {  # STATES SECONDS
    local deadline=$((SECONDS + $2))
    while [[ -n $(jobs_in "$1") ]] && ((SECONDS < deadline)); do
        sleep 0.2
    done
}

cancel_jobs() {
    local jobs
    # Pending jobs first, so that none starts while we wait for the running ones.
    jobs=$(jobs_in PENDING,REQUEUED,REQUEUE_HOLD,REQUEUE_FED)
    if [[ -n $jobs ]]; then
        say "cancelling pending jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
    fi
    # A job whose work is done (submitit's result() already returned) is still RUNNING for a
    # moment while its processes exit; cancelling it then would record it as CANCELLED.
    wait_jobs_gone RUNNING,COMPLETING,SUSPENDED,CONFIGURING 3
    jobs=$(jobs_in RUNNING,SUSPENDED,CONFIGURING,STOPPED,SIGNALING)
    if [[ -n $jobs ]]; then
        say "cancelling running jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
    fi
    # Let the job processes end (KillWait=5 s before SIGKILL) while slurmd can still reap them.
    wait_jobs_gone RUNNING,COMPLETING,SUSPENDED,CONFIGURING,STOPPED,SIGNALING 20
}

# Stops every slurmd of this cluster (whatever N it was started with, pid file or not), then the
# job steps they left behind: those would outlive the cluster.
stop_slurmds() {
    local pid
    for pid in $(cluster_procs slurmd); do
        stop_pid slurmd "$pid"
        say "slurmd (pid $pid) stopped"
    done
    rm -f "$RUN"/slurmd.pid "$RUN"/slurmd-node*.pid
    # Their slurmd is gone, so nothing waits for them; slurmstepd ignores SIGTERM.
    for pid in $(cluster_procs slurmstepd); do
        say "stopping leftover slurmstepd $pid"
        signal_and_wait KILL "$pid" 50 || die "slurmstepd (pid $pid) does not exit"
    done
}

cmd_stop() {
    local i entry name file pid n
    n=$(recorded_nodes)
    if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null && slurmds_running "$n"; then
        cancel_jobs
    fi
    stop_slurmds
    net_down
    shared_mount_down
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        entry=${DAEMONS[i]}
        name=${entry%%:*} file=${entry#*:}
        if pid=$(live_pid "$name" "$file"); then
            stop_pid "$name" "$pid"
            say "$name stopped"
        fi
        rm -f "$file"
    done
    say "cluster stopped (state kept in $ROOT)"
}

# --- status / env --------------------------------------------------------------------------------

cmd_status() {
    local entry name pid all=0 n node
    n=$(recorded_nodes)
    echo "SLURM_ROOT=$ROOT"
    for entry in "${DAEMONS[@]}"; do
        name=${entry%%:*}
        if pid=$(live_pid "$name" "${entry#*:}"); then
            printf '%-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '%-10s stopped\n' "$name"
            all=3
        fi
    done
    for node in $(node_names "$n"); do
        name=slurmd
        ((n == 1)) || name="slurmd $node"
        if pid=$(live_pid slurmd "$(slurmd_pidfile "$n" "$node")"); then
            if ((n == 1)); then
                printf '%-10s running (pid %s)\n' "$name" "$pid"
            else
                printf '%-10s running (pid %s, namespace %s, %s)\n' "$name" "$pid" "${NS_PREFIX}$node" \
                    "$(ip -n "${NS_PREFIX}$node" -o -4 addr show eth0 2>/dev/null | awk '{print $4}')"
            fi
        else
            printf '%-10s stopped\n' "$name"
            all=3
        fi
    done
    if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        sinfo -N -l
    fi
    return "$all"
}

cmd_env() {
    echo "export SLURM_CONF=$SLURM_CONF"
}

usage_error() {
    echo "cluster.sh: usage: $0 {install|start [--nodes N]|stop|status|env|slurmd NODE}${1:+ (got: $1)}" >&2
    exit 2
}

# The daemons, and every job they start, may use all of the machine's cores, whatever this script
# was started from: a caller pinned to one core (a pytest-xdist worker, taskset) would otherwise
# hand its one core down to the whole cluster and every rank of its jobs.
all_cores() { taskset -cp "$(cat /sys/devices/system/cpu/online)" $$ >/dev/null 2>&1 || true; }

case ${1:-} in
    start)
        all_cores
        nodes=1
        case "${2:-}:${3:-}:$#" in
            :*:1) ;;
            --nodes:*:3) nodes=$3 ;;
            --nodes=*::2) nodes=${2#--nodes=} ;;
            *) usage_error "$*" ;;
        esac
        [[ $nodes =~ ^[1-9][0-9]*$ ]] && ((nodes <= MAX_NODES)) ||
            die "--nodes: expected a whole number from 1 to $MAX_NODES, got '$nodes'"
        cmd_start "$nodes"
        ;;
    slurmd)
        [[ $# == 2 ]] || usage_error "$*"
        all_cores
        cmd_slurmd "$2"
        ;;
    install | stop | status | env)
        [[ $# == 1 ]] || usage_error "$*"
        "cmd_$1"
        ;;
    *) usage_error "$*" ;;
esac
