#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for development and CI.
#
#   slurm/devcluster/cluster.sh COMMAND
#
#   install   install the Debian packages if missing (root; fast no-op when present)
#   start     install if needed, then start munged, MariaDB, slurmdbd, slurmctld, slurmd and wait
#             until a job runs (a probe job, "cluster-ready"); prints `export SLURM_CONF=...` on
#             stdout, progress on stderr, so eval "$(slurm/devcluster/cluster.sh start)" works
#   stop      cancel the cluster's jobs (running ones get 3 s to end on their own), stop the
#             daemons, wait for them to exit
#   status    say which daemons run, print sinfo (exit 0 all up, 3 otherwise)
#   env       print `export SLURM_CONF=...`:  eval "$(slurm/devcluster/cluster.sh env)"
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
# /tmp/cifar-infinity-slurm. Nothing is written to /etc or /var. There is no init system here
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
# Environment knobs:
#   SLURM_ROOT           root folder (default /tmp/cifar-infinity-slurm)
#   SLURM_PORT_BASE      slurmctld=BASE, slurmd=BASE+1, slurmdbd=BASE+2, MariaDB=BASE+3
#                        (default 6817: the SLURM defaults 6817/6818/6819, MariaDB on 6820 so it
#                        never collides with a system MariaDB on 3306)
#   SLURM_READY_TIMEOUT  seconds each readiness check may take (default 60)
set -euo pipefail

# gettext-base: envsubst, which fills in the config templates.
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server gettext-base)
CLUSTER_NAME=cifar            # lowercase, no '-': it prefixes the accounting tables in MariaDB
PARTITION=debug

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
SPOOL=$ROOT/spool                  # slurmd SlurmdSpoolDir (slurmstepd sockets)
LOG=$ROOT/log
RUN=$ROOT/run                      # pid files

# Every slurm command below (and every command a user runs against this cluster) must find this
# config; exported here so sinfo/scontrol/sacctmgr/scancel and the daemons all use it.
export SLURM_CONF=$ETC/slurm.conf

# name:pidfile, in start order; stop goes in reverse.
DAEMONS=(
    "munged:$MUNGE_DIR/munged.pid"
    "mariadbd:$DB_DIR/mariadbd.pid"
    "slurmdbd:$RUN/slurmdbd.pid"
    "slurmctld:$RUN/slurmctld.pid"
    "slurmd:$RUN/slurmd.pid"
)

say() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

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

write_configs() {
    local hw field mem_kb HOST CPUS BOARDS SOCKETS CORES THREADS REAL_MEM DB_PASS
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

# --- start ---------------------------------------------------------------------------------------

all_running() {
    local entry
    for entry in "${DAEMONS[@]}"; do
        live_pid "${entry%%:*}" "${entry#*:}" >/dev/null || return 1
    done
}

any_running() {
    local entry
    for entry in "${DAEMONS[@]}"; do
        live_pid "${entry%%:*}" "${entry#*:}" >/dev/null && return 0
    done
    return 1
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
mariadb_ok() { mariadb-admin --no-defaults -S "$DB_SOCK" -u root ping; }
dbd_ok() { sacctmgr -n list cluster; }
# The node accepts work: idle, or busy with jobs (it may hold jobs from before a restart).
node_ok() { sinfo -h -o %T | grep -Eqx 'idle|mixed|allocated'; }

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

start_slurmctld() {
    slurmctld  # forks; keeps jobs and node state from $STATE
    wait_for "slurmctld" "$LOG/slurmctld.log" ctld_up
}

start_slurmd() {
    slurmd  # forks
    wait_for "slurmd (node idle)" "$LOG/slurmd.log" node_ok
}

# For about 3 s after it starts, slurmctld leaves batch jobs pending (its first scheduling pass
# comes late; srun allocations are not delayed). Run one tiny batch job to the end here, so that
# the cluster `start` hands over runs the next job at once, and so that accounting is checked end
# to end (sacct must report the job COMPLETED). It shows in sacct as "cluster-ready".
probe_done() { [[ $(sacct -n -X -P -j "$1" -o State 2>/dev/null) == COMPLETED ]]; }

probe_job() {
    local t0=$SECONDS jid
    jid=$(sbatch --parsable --job-name=cluster-ready --partition="$PARTITION" --time=1 --ntasks=1 \
        --output=/dev/null --wrap=true) || die "sbatch of the probe job failed"
    wait_for "probe job $jid" "$LOG/slurmctld.log" probe_done "$jid"
    say "probe job $jid ran ($((SECONDS - t0)) s)"
}

cmd_start() {
    local t0=$SECONDS
    if [[ -n $(missing_packages) ]]; then
        cmd_install
    fi
    if all_running && ctld_up; then
        say "cluster is already up (SLURM_ROOT=$ROOT); nothing to do"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "start needs root (the daemons run as root)"
    if any_running; then
        say "cluster is partly running; stopping it to start cleanly"
        cmd_stop
    fi
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
        port_free "$port" || die "port $port on 127.0.0.1 is in use by another program; set SLURM_PORT_BASE"
    done

    make_folders
    write_configs
    # Plain calls, not `f && say`: bash ignores `set -e` inside a function called from an && list.
    start_munged
    say "munged up"
    start_mariadb
    say "MariaDB up (127.0.0.1:$DB_PORT)"
    start_slurmdbd
    say "slurmdbd up (127.0.0.1:$DBD_PORT)"
    start_slurmctld
    say "slurmctld up (127.0.0.1:$CTLD_PORT)"
    start_slurmd
    say "slurmd up; partition $PARTITION: $(sinfo -h -o '%D node(s), %c CPUs, %m MB, %T')"
    probe_job
    say "cluster up in $((SECONDS - t0)) s; for slurm commands and submitit:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# --- stop ----------------------------------------------------------------------------------------

# slurmstepd processes of this cluster (found by the SLURM_CONF they inherit from slurmd).
cluster_stepds() {
    local pid
    for pid in $(pgrep -x slurmstepd || true); do
        # (The process may end while we look: silence the shell's own redirection error too.)
        if { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF"; then
            echo "$pid"
        fi
    done
}

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

cmd_stop() {
    local i entry name file pid
    if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null && live_pid slurmd "$RUN/slurmd.pid" >/dev/null; then
        cancel_jobs
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        entry=${DAEMONS[i]}
        name=${entry%%:*} file=${entry#*:}
        if pid=$(live_pid "$name" "$file"); then
            stop_pid "$name" "$pid"
            say "$name stopped"
        fi
        rm -f "$file"
        # Right after slurmd: job steps it left behind would outlive the cluster.
        if [[ $name == slurmd ]]; then
            for pid in $(cluster_stepds); do
                say "stopping leftover slurmstepd $pid"
                stop_pid slurmstepd "$pid"
            done
        fi
    done
    say "cluster stopped (state kept in $ROOT)"
}

# --- status / env --------------------------------------------------------------------------------

cmd_status() {
    local entry name pid all=0
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
    if live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null; then
        sinfo
    fi
    return "$all"
}

cmd_env() {
    echo "export SLURM_CONF=$SLURM_CONF"
}

usage_error() {
    echo "cluster.sh: usage: $0 {install|start|stop|status|env}${1:+ (got: $1)}" >&2
    exit 2
}

[[ $# == 1 ]] || usage_error "$*"
case $1 in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) usage_error "$1" ;;
esac
