#!/usr/bin/env bash
# Builds the project's container image from the Dockerfile, tagged with the commit it was built from.
#
#   containers/build.sh [--local-base] [--engine podman|docker] [--name NAME]
#
# The image is NAME:<commit> (NAME: cifar-infinity; "<sha>-dirty" when tracked files have uncommitted
# changes) and NAME:latest. Its build context is the checkout's files as git lists them (tracked,
# and untracked ones not ignored), never data, runs or the virtual environment, plus
# trainer/_stamp.json (python -m trainer.provenance stamp): the image has no .git, and the stamp is
# how every run inside it still names its commit. The last line says the image's size and how long
# the build took.
#
# --engine      podman where it is installed, docker otherwise (the default); or as named.
# --local-base  the Dockerfile's base image (its FROM line) cannot be pulled where no image registry
#               is reachable: make it here instead, a minimal Debian root file system from the
#               Debian mirror (debootstrap), tagged with the FROM line's name. That base is plain
#               Debian, not the CUDA one: torch's wheels bring their own CUDA libraries, so the image
#               builds and runs the same code, on the CPU (../docs/containers.md says what this
#               checks and what it does not). Without the flag a base that is neither here nor
#               pullable is an error naming this flag.
# --name        the image name (default cifar-infinity).
#
# Needs: git, python3 (for the stamp), and podman or docker; --local-base also needs debootstrap
# and root. With podman, a runtime that cannot start containers on this host (crun: "cgroups in
# hybrid mode not supported", "setrlimit RLIMIT_NOFILE") is detected by a trial run, and the build
# then uses containers/podman-runc.conf (runc and ulimits it can set), saying so.
# Where HTTPS is intercepted by a proxy with its own CA, podman's build mounts the host's CA bundle
# for pip (read-only, for the build only: the image keeps its own certificates).
set -euo pipefail

say() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ENGINE= LOCAL_BASE=0 NAME=cifar-infinity
while [[ $# -gt 0 ]]; do
    case $1 in
        --local-base) LOCAL_BASE=1 ;;
        --engine) [[ $# -ge 2 ]] || die "--engine needs podman or docker"; ENGINE=$2; shift ;;
        --engine=*) ENGINE=${1#--engine=} ;;
        --name) [[ $# -ge 2 ]] || die "--name needs a name"; NAME=$2; shift ;;
        --name=*) NAME=${1#--name=} ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

if [[ -z $ENGINE ]]; then
    if command -v podman >/dev/null; then ENGINE=podman
    elif command -v docker >/dev/null; then ENGINE=docker
    else die "neither podman nor docker is installed (Debian: apt-get install podman)"; fi
fi
[[ $ENGINE == podman || $ENGINE == docker ]] || die "--engine: expected podman or docker, got '$ENGINE'"
command -v "$ENGINE" >/dev/null || die "--engine $ENGINE: not installed"
[[ $NAME =~ ^[a-z0-9][a-z0-9._/-]*$ ]] || die "--name: '$NAME' is not an image name (lowercase letters, digits, . _ - /)"
git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO is not a git checkout: the image is tagged with its commit"

BASE=$(awk 'toupper($1) == "FROM" { print $2; exit }' "$REPO/Dockerfile")
[[ -n $BASE ]] || die "no FROM line in $REPO/Dockerfile"
SHA=$(git -C "$REPO" rev-parse --short=12 HEAD)
[[ -z $(git -C "$REPO" status --porcelain --untracked-files=no) ]] || SHA=$SHA-dirty
TAG=$NAME:$SHA

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cifar-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# ---- the base image ----------------------------------------------------------------------------
# A short name in a FROM line (nvidia/cuda:...) is docker.io's: the local base is tagged with both
# spellings, so the lookup finds it whichever one the engine asks for.
qualified=$BASE
[[ ${BASE%%/*} == *.* || ${BASE%%/*} == localhost ]] || qualified=docker.io/$BASE
[[ $qualified == docker.io/*/* ]] || qualified=docker.io/library/${qualified#docker.io/}
if have_image "$BASE" || have_image "$qualified"; then
    say "base $BASE: present"
elif [[ $LOCAL_BASE == 1 ]]; then
    command -v debootstrap >/dev/null || die "--local-base needs debootstrap (apt-get install debootstrap)"
    [[ $(id -u) == 0 ]] || die "--local-base needs root (debootstrap)"
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p; s/^deb \+\(http[^ ]*debian\) .*/\1/p' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "base $BASE: not here; making it locally: Debian bookworm (minbase) from $mirror (about a minute)"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    tar -C "$WORK/rootfs" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$qualified" >/dev/null
    [[ $qualified == "$BASE" ]] || "$ENGINE" tag "$qualified" "$BASE"
    rm -rf "$WORK/rootfs"
    say "base $BASE: Debian bookworm, made here (a stand-in for the Dockerfile's base: CPU only)"
else
    say "base $BASE: not here; pulling it"
    "$ENGINE" pull "$BASE" >&2 || die "the base image $BASE could not be pulled (no registry reachable?); \
--local-base makes a Debian stand-in for it here"
fi

have_image "$qualified" || qualified=$BASE  # a base found under the FROM line's spelling only

# ---- podman's runtime --------------------------------------------------------------------------
if [[ $ENGINE == podman && -z ${CONTAINERS_CONF:-} ]]; then
    if ! podman run --rm --pull=never "$qualified" true > "$WORK/probe.log" 2>&1; then
        command -v runc >/dev/null || { cat "$WORK/probe.log" >&2; die "podman cannot start a container here \
(above) and runc, the fallback runtime, is not installed (apt-get install runc)"; }
        export CONTAINERS_CONF=$HERE/podman-runc.conf
        say "podman's default runtime cannot start a container here ($(tail -n1 "$WORK/probe.log")); using $CONTAINERS_CONF"
        podman run --rm --pull=never "$qualified" true >/dev/null \
            || die "podman cannot start a container with $CONTAINERS_CONF either"
    fi
fi

# ---- the build context: the checkout's files and the stamp --------------------------------------
mkdir "$WORK/context"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null -T - --ignore-failed-read -c 2>/dev/null) | tar -x -C "$WORK/context"
(cd "$REPO" && python3 -m trainer.provenance stamp --out "$WORK/context/trainer/_stamp.json" >/dev/null) \
    || die "could not write the commit stamp (python3 -m trainer.provenance stamp)"

build=("$ENGINE" build -t "$TAG" -t "$NAME:latest" --label "org.opencontainers.image.revision=$SHA")
if [[ $ENGINE == podman ]]; then
    build+=(--pull=never)
    bundle=/etc/ssl/certs/ca-certificates.crt
    if [[ -f $bundle ]]; then
        printf '[global]\ncert = /etc/ssl/host-ca.crt\n' > "$WORK/pip.conf"
        build+=(-v "$bundle:/etc/ssl/host-ca.crt:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro")
    fi
fi
say "building $TAG from $REPO/Dockerfile with $ENGINE (first time: torch and its CUDA wheels, several GB)"
"${build[@]}" -f "$WORK/context/Dockerfile" "$WORK/context" >&2 || die "$ENGINE build failed (output above)"

took=$((SECONDS - START))
bytes=$("$ENGINE" image inspect -f '{{.Size}}' "$TAG")
awk -v tag="$TAG" -v b="$bytes" -v t="$took" \
    'BEGIN { printf "build.sh: built %s (%.2f GB) in %d min %02d s\n", tag, b / 1e9, t / 60, t % 60 }'
