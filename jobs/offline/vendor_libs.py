"""Vendor the libraries auditwheel leaves to the system into an already repaired wheel.

    python jobs/offline/vendor_libs.py WHEEL OUTDIR [--lib SONAME ...]

auditwheel copies every library a wheel needs into `<pkg>.libs/` except those on the manylinux
allow-list, which it expects every Linux machine to have. Debian's OpenCV core needs libGLX, which
needs libX11 (allow-listed), which needs libxcb, libXau, libXdmcp, libbsd and libmd: on a machine
without X11 (a headless GPU node) `import ffcv` then fails with "libX11.so.6: cannot open shared
object file". This script does for those sonames what auditwheel does for the rest: copies each
from this machine into `<pkg>.libs/` under a name with a hash of its contents, sets its SONAME to
that name, rewrites the DT_NEEDED entries that point at it, and gives each copied library
RPATH=$ORIGIN so it finds its own dependencies beside it. The wheel is then repacked (RECORD
recomputed by `wheel pack`). Needs patchelf and the `wheel` package; Linux only.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The X11 chain under Debian's libGLX (see the docstring).
DEFAULT_SONAMES = ("libX11.so.6", "libxcb.so.1", "libXau.so.6", "libXdmcp.so.6", "libbsd.so.0", "libmd.so.0")


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed(lib: Path) -> list[str]:
    return run("patchelf", "--print-needed", str(lib)).split()


def system_path(soname: str) -> Path:
    """Where this machine's loader finds `soname` (64-bit x86 entries of the ldconfig cache)."""
    for line in run("ldconfig", "-p").splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and m.group(1) == soname and "x86-64" in m.group(2):
            return Path(m.group(3)).resolve()
    raise SystemExit(f"error: {soname}: not found on this machine (ldconfig -p); install it or drop --lib {soname}")


def hashed_name(path: Path) -> str:
    """auditwheel's scheme: libX11.so.6.4.0 -> libX11-<8 hex of sha256>.so.6.4.0."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    stem, _, rest = path.name.partition(".so")
    return f"{stem}-{digest}.so{rest}"


def vendor(wheel: Path, outdir: Path, sonames: tuple[str, ...]) -> Path:
    work = Path(tempfile.mkdtemp(prefix="vendor-"))
    try:
        run(sys.executable, "-m", "wheel", "unpack", "--dest", str(work), str(wheel))
        (root,) = [p for p in work.iterdir() if p.is_dir()]
        libs_dirs = [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".libs")]
        if len(libs_dirs) != 1:
            raise SystemExit(f"error: {wheel}: expected one <pkg>.libs folder (run auditwheel repair first)")
        libs = libs_dirs[0]
        elves = [p for p in root.rglob("*.so*") if p.is_file()]
        renamed: dict[str, str] = {}  # soname -> vendored file name
        queue = list(elves)
        while queue:  # follow the chain: a copied library may need another one of the list
            obj = queue.pop()
            for dep in needed(obj):
                if dep in sonames and dep not in renamed:
                    src = system_path(dep)
                    name = hashed_name(src)
                    dst = libs / name
                    shutil.copy2(src, dst)
                    dst.chmod(0o755)
                    run("patchelf", "--set-soname", name, str(dst))
                    run("patchelf", "--force-rpath", "--set-rpath", "$ORIGIN", str(dst))
                    renamed[dep] = name
                    elves.append(dst)
                    queue.append(dst)
        if not renamed:
            print(f"{wheel.name}: none of {', '.join(sonames)} is needed; wheel unchanged")
        for obj in elves:
            for dep in needed(obj):
                if dep in renamed:
                    run("patchelf", "--replace-needed", dep, renamed[dep], str(obj))
        for dep, name in sorted(renamed.items()):
            print(f"vendored {dep} as {libs.name}/{name}")
        outdir.mkdir(parents=True, exist_ok=True)
        before = set(outdir.glob("*.whl"))
        run(sys.executable, "-m", "wheel", "pack", "--dest-dir", str(outdir), str(root))
        (packed,) = set(outdir.glob("*.whl")) - before or {outdir / wheel.name}
        return packed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--lib", action="append", metavar="SONAME", help=f"a soname to vendor (default: {' '.join(DEFAULT_SONAMES)})")
    args = parser.parse_args()
    print(vendor(args.wheel, args.outdir, tuple(args.lib or DEFAULT_SONAMES)))


if __name__ == "__main__":
    main()
