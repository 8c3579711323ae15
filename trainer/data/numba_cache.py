"""numba's disk cache for what ffcv compiles.

ffcv compiles with numba in every process anew: a typed dict as it is imported (ffcv.fields'
image modes: 2-3 s), and each loader's pipeline stages (decoders, flip, translate, cutout: about
5 s for a training and a test loader). That is about 8 s of CPU per rank before its first step,
and the same again for every job of a sweep; numba can keep compiled code on disk, but ffcv does
not ask it to. `cache_ffcv_compiles` asks, before ffcv is imported.

Safe to keep: numba keys each cached function on its bytecode, its closure's values (a stage's
parameters: the flip probability, the padding), the argument types, the CPU and its features,
and the source file's time stamp (a new ffcv version compiles anew), and refuses by itself what
holds one process's pointers (the JPEG decoder's ctypes calls: compiled each time, as before).
Where the cache lives is numba's choice: `__pycache__` beside the source when that is writable,
else the user's cache folder; NUMBA_CACHE_DIR chooses another (docs/data.md).
"""

from __future__ import annotations

import warnings

_asked = False


def cache_ffcv_compiles() -> None:
    """Turns numba's disk cache on for ffcv's typed dict and its pipeline stages; once a process.
    Imports ffcv: raises what its import raises."""
    global _asked
    if _asked:
        return
    import numba.typed.typeddict as typeddict
    from numba.core.errors import NumbaWarning

    # Before ffcv's import, which fills its typed dict (compiling setitem, getitem, the dict itself).
    for compiled in vars(typeddict).values():
        _enable_caching(compiled)
    # numba warns of each function it will not cache (the decoders' ctypes calls), every process.
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)

    from ffcv.pipeline.compiler import Compiler

    compile_once = Compiler.compile.__func__

    def compile_cached(cls, code, signature=None):
        compiled = compile_once(cls, code, signature)
        _enable_caching(compiled)
        return compiled

    Compiler.compile = classmethod(compile_cached)
    _asked = True


def _enable_caching(compiled: object) -> None:
    """numba's cache for `compiled`, where it can have one: not for plain functions (ffcv's Compiler
    turned off), nor where numba finds no folder to write (a read-only install and no writable
    user cache folder) or the code has no source file. A cache that fails to read or write never
    fails the compile: numba raises a failed write (a full disk) out of the compile itself, which
    would end ffcv's loader thread, and the training with it."""
    if not hasattr(compiled, "enable_caching"):
        return
    try:
        compiled.enable_caching()
    except RuntimeError:  # numba's "cannot cache function ...: no locator available"
        return
    cache = compiled._cache
    load, save = cache.load_overload, cache.save_overload

    def load_or_compile(sig, target_context):
        try:
            return load(sig, target_context)
        except Exception:  # an unreadable or damaged entry: compiled anew, as without a cache
            return None

    def save_or_skip(sig, data):
        try:
            save(sig, data)
        except OSError:  # a full or read-only disk: this process keeps its code, the next compiles again
            pass

    cache.load_overload, cache.save_overload = load_or_compile, save_or_skip
