#!/usr/bin/env bash
# Run a command with this machine's copies of the libraries the ffcv wheel vendors made unloadable.
#
#     jobs/offline/hide_system_libs.sh COMMAND [ARG...]
#
# In a private mount namespace (root; `unshare -m`), /dev/null is bind-mounted over every file
# the loader cache lists for OpenCV, libturbojpeg, the X11/GLX chain (libGLX, libGLdispatch,
# libX11, libxcb, libXau, libXdmcp, libbsd, libmd) and OpenCV's own dependencies (TBB,
# BLAS/LAPACK, gfortran, quadmath), so a process that still needs one of them fails to load it,
# as it would on a machine without them. Nothing changes outside the command.
set -euo pipefail

if [[ ${1:-} == --inside ]]; then
    shift
    while [[ $1 != -- ]]; do mount --bind /dev/null "$1"; shift; done
    shift
    exec "$@"
fi
[[ $# -gt 0 ]] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }

patterns='^(libopencv_|libturbojpeg[.]so|libGLX[.]so|libGLdispatch[.]so|libX11[.]so|libxcb[.]so|libXau[.]so|libXdmcp[.]so|libbsd[.]so|libmd[.]so|libtbb[.]so|libblas[.]so|liblapack[.]so|libgfortran[.]so|libquadmath[.]so)'
mapfile -t files < <(ldconfig -p | awk -v re="$patterns" '$1 ~ re {print $NF}' | xargs -r readlink -f | sort -u)
[[ ${#files[@]} -gt 0 ]] || { echo "hide_system_libs: none of the libraries is installed here; running as is" >&2; exec "$@"; }
exec unshare -m --propagation private "$0" --inside "${files[@]}" -- "$@"
