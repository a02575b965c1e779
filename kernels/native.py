"""The compiled CPU kernels (`kernels/cpu/*.c`): built once per source version with the system C
compiler into the Domino cache (`$DOMINO_CACHE/kernels`, about a second) and loaded with ctypes.
Their OpenMP loops share torch's libgomp runtime. `library()` is None on CPUs without AVX512 or
without a C compiler; callers then run their PyTorch references (same contracts, slower). On AVX2
CPUs without AVX512, `library_avx2()` still gives the int8 GEMM and the Hadamard rotation of fp32
rows (kernels/cpu/avx2).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from domino_backend.cpu import cpu_flags

SOURCES = sorted(Path(__file__).with_name("cpu").glob("*.c"))
HEADERS = sorted(Path(__file__).with_name("cpu").glob("*.h"))
COMMON = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mamx-tile", "-mamx-int8", "-mamx-bf16", "-mavx512bf16",
          *COMMON]
# CPUs with AVX2 but no AVX512: the int8 GEMM (same bits as the AVX512 one) and the fp32 Hadamard
# rotation of its input (kernels/cpu/avx2).
AVX2_SOURCES = sorted(Path(__file__).with_name("cpu").joinpath("avx2").glob("*.c"))
AVX2_CFLAGS = ["-mavx2", "-mfma", *COMMON]
_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # name: (argtypes, restype)
    "w8a8_linear": ([_p, _i32, _i64, _i64, _p, _p, _p, _p, _i64, _p, _i32, _i32, _i32], None),
    "w8a8_amx_init": ([], _i32),
    "attend_rows": ([_p, _i64, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i32, _i32, _i32, ctypes.c_float, _p, _p, _i64,
                     _p, _i32, _i32], _i32),
    "attend_batch": ([_i64, _p, _i32, _i32, _i32, ctypes.c_float, _i32], _i32),
    "add_rms_norm": ([_p, _i64, _p, _i64, _p, _i64, _i64, _p, ctypes.c_float, _p, _i32], None),
    "rope": ([_p, _i64, _i64, _i32, _i64, _p, _p, _i32], None),
    "silu_mul": ([_p, _i64, _p, _i64, _i64, _i64, _p, _i64, _i32], None),
    "layer_attn_in": ([_p, _p, _p, _i64, _i64, _p, ctypes.c_float, _p, _p, _p, _i32, _i32, _i32, _p, _i32, _i32], None),
    "layer_mlp": ([_p, _p, _p, _i64, _i64, _p, _p, ctypes.c_float, _p, _p, _i32, _p, _i32, _i32], None),
    "hadamard16": ([_p, _i64, _i64, _i64, _p, _i64, _i32], None),
    "hadamard16_f32": ([_p, _i64, _i64, _i64, _p, _i64, _i32], None),
}


def cpu_has_avx512() -> bool:
    return {"avx512f", "avx512bw"} <= cpu_flags()


def cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no AVX512, no C compiler, or the build failed: said on stderr)."""
    return _build("domino-cpu", SOURCES + HEADERS, CFLAGS, SIGNATURES) if cpu_has_avx512() else None


@functools.cache
def library_avx2() -> ctypes.CDLL | None:
    """The AVX2 kernels (`w8a8_linear`, `hadamard16_f32`), or None (no AVX2/FMA, no C compiler, or
    the build failed)."""
    return (_build("domino-avx2", AVX2_SOURCES, AVX2_CFLAGS, {f: SIGNATURES[f] for f in ("w8a8_linear", "hadamard16_f32")})
            if cpu_has_avx2() else None)


def _build(name: str, files: list[Path], flags: list[str], signatures: dict) -> ctypes.CDLL | None:
    """Compile `files`' .c sources into a cached shared library (keyed by the files and flags) and
    load it with `signatures` set."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("[domino] no C compiler found: the CPU kernels fall back to slower PyTorch references", file=sys.stderr)
        return None
    from domino_backend.models import cache_dir

    tag = hashlib.sha256(b"".join(s.name.encode() + s.read_bytes() for s in files) + " ".join(flags).encode())
    lib = cache_dir() / "kernels" / f"{name}-{tag.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            sources = [str(f) for f in files if f.suffix == ".c"]
            res = subprocess.run([cc, *flags, "-o", str(out), *sources], capture_output=True, text=True)
            if res.returncode:
                print(f"[domino] compiling the CPU kernels failed (they fall back to slower PyTorch references):\n"
                      f"{res.stderr[-2000:]}", file=sys.stderr)
                return None
            os.replace(out, lib)  # atomic: a concurrent build simply wins or loses the rename
    dll = ctypes.CDLL(str(lib))
    for fname, (args, res) in signatures.items():
        fn = getattr(dll, fname)
        fn.argtypes, fn.restype = args, res
    return dll


@functools.cache
def tile_state() -> bool:
    """Whether Linux granted this process the AMX tile state (requested once, for every kernel that
    uses tiles; each also checks its own CPU flag, amx_int8 or amx_bf16)."""
    lib = library()
    return lib is not None and lib.w8a8_amx_init() == 1
