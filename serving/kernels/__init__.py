"""Native CPU kernels: C sources shipped with textmill, compiled on first use by the machine's C compiler (`$CC`, else
`cc`/`gcc`) into a per-user cache and loaded through ctypes.

Why not a prebuilt wheel or a torch C++ extension: the fast build uses the CPU's own instructions (AVX-512 VNNI), so it
is compiled where it runs; plain C compiles in under a second (a torch extension takes a minute and needs ninja), and
the kernels are called on raw buffers, so they need nothing from torch's headers. Where no compiler is found the
callers fall back to torch's kernels (logged once), nothing fails.

Cache: `$XDG_CACHE_HOME/textmill/kernels` (default `~/.cache/...`), else a private (0700) folder under the temp dir;
each library is named by a hash of its source, flags and compiler, and written to a temp name and renamed, so
concurrent processes never load a half-written file.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_linear.c")
VNNI_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
_VNNI_CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni"]
_BASE_CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-std=gnu11"]


class KernelBuildError(RuntimeError):
    """The C compiler is missing or failed; the message carries its output."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of this CPU from /proc/cpuinfo's first `flags` line (empty off Linux)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    """This x86-64 CPU has the AVX-512 subsets the VNNI build of the int8 kernel uses."""
    flags = cpu_flags() if flags is None else flags
    return platform.machine() in ("x86_64", "AMD64") and all(f in flags for f in VNNI_FLAGS)


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$XDG_CACHE_HOME/textmill/kernels`, or a private temp folder when the home
    cache cannot be written (read-only root filesystems in containers)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textmill" / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    private = Path(tempfile.gettempdir()) / f"textmill-kernels-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:   # another user's folder: never load code from it
        raise KernelBuildError(f"{private} is not a private folder of this user; set XDG_CACHE_HOME")
    return private


def compiler() -> str | None:
    """The C compiler to use: `$CC`, else `cc` or `gcc` on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(source: Path, flags: list[str], *, timeout_s: float = 120.0) -> Path:
    """Compile `source` into a shared library (cached by source, flags and compiler) and return its path.
    Raises KernelBuildError with the compiler's output when it fails or no compiler is found."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    command = [cc, *_BASE_CFLAGS, *flags]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C compiler {cc!r}: {e}") from e
    key = hashlib.sha256("\0".join([source.read_text(), *command, version]).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([*command, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=timeout_s)
        if done.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"compiling {source.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled %s (%s) into %s", source.name, " ".join(flags) or "portable", target)
    return target


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True, eq=False)
class Int8Kernel:
    """The compiled int8 linear (serving/kernels/int8_linear.c). `isa` is "avx512-vnni" or "portable"; both builds
    give bitwise equal results."""
    lib: ctypes.CDLL
    isa: str

    def __deepcopy__(self, memo: dict) -> "Int8Kernel":   # a loaded library is shared, never copied
        return self

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """int8 weight [N, K] -> the kernel's packed layout (1-D int8, N rounded up to 64 times K rounded up to 4)."""
        n, k = weight.shape
        weight = weight.to(torch.int8).contiguous()
        out = torch.empty(int(self.lib.tm_packed_size(n, k)), dtype=torch.int8)
        self.lib.tm_pack_weights(weight.data_ptr(), n, k, out.data_ptr())
        return out

    def linear(self, x: torch.Tensor, packed: torch.Tensor, n: int, w_scale: torch.Tensor, w_sum: torch.Tensor,
               bias: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """y = W8A8(x) as in the C file's header: x [M, K] fp32 contiguous; w_scale, bias [N] fp32; w_sum [N] int32
        (row sums of the int8 weight); returns y [M, N] fp32. `threads`: torch's intra-op thread count by default."""
        m, k = x.shape
        y = torch.empty(m, n)
        if m == 0:
            return y
        kp = (k + 3) // 4 * 4
        q = torch.empty(m * kp, dtype=torch.uint8)
        x_scale, x_zero = torch.empty(m), torch.empty(m, dtype=torch.int32)
        self.lib.tm_int8_linear(x.data_ptr(), m, k, packed.data_ptr(), n, w_scale.data_ptr(), w_sum.data_ptr(),
                                bias.data_ptr(), y.data_ptr(), q.data_ptr(), x_scale.data_ptr(), x_zero.data_ptr(),
                                threads or torch.get_num_threads())
        return y


@functools.cache
def int8_kernel(portable: bool = False) -> Int8Kernel:
    """The int8 linear kernel compiled for this CPU (the VNNI build where `has_vnni()`, else portable C; `portable`
    forces the portable one). Compiled once per process (and cached on disk). Raises KernelBuildError."""
    vnni = not portable and has_vnni()
    flags = _VNNI_CFLAGS if vnni else ["-DTM_PORTABLE"]
    lib = ctypes.CDLL(str(build(SOURCE, flags)))
    lib.tm_packed_size.argtypes, lib.tm_packed_size.restype = [_I64, _I64], _I64
    lib.tm_pack_weights.argtypes, lib.tm_pack_weights.restype = [_P, _I64, _I64, _P], None
    lib.tm_int8_linear.argtypes = [_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _INT]
    lib.tm_int8_linear.restype = None
    lib.tm_isa.restype = _INT
    isa = "avx512-vnni" if lib.tm_isa() == 1 else "portable"
    if vnni and isa != "avx512-vnni":
        raise KernelBuildError("the compiler did not enable AVX-512 VNNI for int8_linear.c")
    return Int8Kernel(lib, isa)


@functools.cache
def fast_int8_kernel() -> Int8Kernel | None:
    """The VNNI build when this CPU has VNNI and it compiles, else None (logged once, with the reason): what
    `Int8Linear` uses by default, ahead of fbgemm."""
    if not has_vnni():
        return None
    try:
        return int8_kernel()
    except (KernelBuildError, OSError) as e:
        log.warning("the native int8 kernel is unavailable, using torch's fbgemm instead: %s", e)
        return None
