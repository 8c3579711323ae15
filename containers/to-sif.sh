#!/usr/bin/env bash
# An Apptainer image (.sif) made from a built podman/docker image, without apptainer and without a
# registry: for clusters whose jobs run `apptainer exec --nv` (cluster YAML: container: FILE.sif).
#
#   containers/to-sif.sh [--engine podman|docker] IMAGE OUT.sif      # IMAGE: e.g. cifar-infinity:<commit>
#
# What `apptainer build OUT.sif docker-daemon://IMAGE` does, by hand: the image's file system
# (engine export of a container made from it), plus the /.singularity.d files Apptainer reads at
# run time (the image's ENV as env/10-docker2singularity.sh, a runscript that runs the image's CMD,
# the action scripts exec/run/shell), squashed (mksquashfs, gzip: every Apptainer reads it) and
# wrapped in SIF (siftool: one partition, Squash, System, amd64). OUT.sif is written atomically.
#
# Verified here: the .sif is assembled and siftool lists its partition. NOT verified: running it
# (Apptainer has no package for this machine's Debian): a site with apptainer should check
# `apptainer exec OUT.sif python -m trainer.models` once, or use `apptainer build` itself.
# Needs root (the image's files keep their owners), squashfs-tools and siftool (Debian packages).
set -euo pipefail

say() { echo "to-sif.sh: $*" >&2; }
die() { echo "to-sif.sh: error: $*" >&2; exit 1; }

ENGINE=
args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --engine) [[ $# -ge 2 ]] || die "--engine needs podman or docker"; ENGINE=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) args+=("$1") ;;
    esac
    shift
done
[[ ${#args[@]} == 2 ]] || die "usage: to-sif.sh [--engine podman|docker] IMAGE OUT.sif"
IMAGE=${args[0]} OUT=${args[1]}
[[ $OUT == *.sif ]] || die "OUT must end in .sif, got '$OUT'"
[[ -d $(dirname "$OUT") ]] || die "$(dirname "$OUT"): no such folder"
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"
for tool in mksquashfs siftool; do
    command -v $tool >/dev/null || die "$tool is not installed (apt-get install squashfs-tools siftool)"
done
[[ $(id -u) == 0 ]] || die "needs root: the image's files must keep their owners"
"$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE here (containers/build.sh builds it)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cifar-sif.XXXXXX")
cid=
cleanup() { [[ -z $cid ]] || "$ENGINE" rm -f "$cid" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
START=$SECONDS

say "exporting $IMAGE's file system"
cid=$("$ENGINE" create "$IMAGE" true)
mkdir "$WORK/rootfs"
"$ENGINE" export "$cid" | tar -x -C "$WORK/rootfs" --numeric-owner

# ---- what Apptainer reads at run time ----------------------------------------------------------
sd=$WORK/rootfs/.singularity.d
mkdir -p "$sd/env" "$sd/actions" "$sd/libs"
{
    echo '# the image ENV lines (what apptainer build writes from a Docker image)'
    "$ENGINE" image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | while IFS= read -r line; do
        if [[ -n $line ]]; then printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"; fi
    done
} > "$sd/env/10-docker2singularity.sh"
workdir=$("$ENGINE" image inspect -f '{{.Config.WorkingDir}}' "$IMAGE")
cmd=$("$ENGINE" image inspect -f '{{range .Config.Entrypoint}}{{printf "%q " .}}{{end}}{{range .Config.Cmd}}{{printf "%q " .}}{{end}}' "$IMAGE")
cat > "$sd/runscript" <<EOF
#!/bin/sh
# apptainer run: the image's ENTRYPOINT and CMD, or the arguments given
cd ${workdir:-/}
if [ \$# -gt 0 ]; then exec "\$@"; fi
exec $cmd
EOF
for action in exec run shell; do
    case $action in
        exec) last='exec "$@"' ;;
        run) last='exec /.singularity.d/runscript "$@"' ;;
        shell) last='exec /bin/bash "$@"' ;;
    esac
    printf '#!/bin/sh\nfor f in /.singularity.d/env/*.sh; do [ -f "$f" ] && . "$f"; done\n%s\n' "$last" > "$sd/actions/$action"
done
chmod 755 "$sd/runscript" "$sd/actions/"*
ln -sfn .singularity.d/runscript "$WORK/rootfs/singularity"

say "squashing (gzip)"
mksquashfs "$WORK/rootfs" "$WORK/rootfs.squashfs" -noappend -comp gzip -quiet -no-progress >&2
rm -rf "$WORK/rootfs"
siftool new "$WORK/image.sif"
siftool add "$WORK/image.sif" "$WORK/rootfs.squashfs" --datatype 4 --parttype 1 --partfs 1 --partarch 2
mv "$WORK/image.sif" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
took=$((SECONDS - START))
awk -v out="$OUT" -v b="$(stat -c %s "$OUT")" -v t="$took" \
    'BEGIN { printf "to-sif.sh: wrote %s (%.2f GB) in %d min %02d s; not run here (no apptainer)\n", out, b / 1e9, t / 60, t % 60 }'
