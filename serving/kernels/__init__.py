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
import mmap
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
_VNNI_LIBS = ["-lmvec", "-lm"]   # glibc's vector math (expf on 16 lanes), then scalar libm
_BASE_CFLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-std=gnu11"]


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


def build(source: Path, flags: list[str], libs: tuple[str, ...] = ("-lm",), *, timeout_s: float = 120.0) -> Path:
    """Compile `source` into a shared library (cached by source, flags, libraries and compiler) and return its path.
    Raises KernelBuildError with the compiler's output when it fails or no compiler is found."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    command = [cc, *_BASE_CFLAGS, *flags, *libs]
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
        done = subprocess.run([cc, *_BASE_CFLAGS, *flags, str(source), "-o", tmp, *libs], capture_output=True,
                              text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
        if os.path.getsize(tmp) == 0:   # a "compiler" that exits 0 without output must not poison the cache
            raise KernelBuildError(f"{cc} wrote no library for {source.name}")
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"compiling {source.name} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled %s (%s) into %s", source.name, " ".join(flags) or "portable", target)
    return target


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
HUGE_PAGE = 2 << 20
_threads: int | None = None


def set_threads(n: int) -> None:
    """Threads the native kernels use per call (their own pool: the caller plus n - 1 helpers). `serving.engine.
    configure_cpu_threads` sets it with torch's intra-op count; until then, torch's count when first asked (from a
    thread whose count `run_torch_inline` lowered, that would be 1: set it)."""
    global _threads
    _threads = max(1, int(n))


def kernel_threads() -> int:
    """The native kernels' thread count (see `set_threads`)."""
    global _threads
    if _threads is None:
        _threads = torch.get_num_threads()
    return _threads


def run_torch_inline() -> bool:
    """Make torch's CPU ops on the *calling thread* run without OpenMP parallel regions (its OpenMP thread count
    becomes 1; other threads keep theirs). For a thread whose heavy work is the native kernels (their own pool):
    torch's idle OpenMP helper spinning beside the kernels' helpers made a GPT-2-medium int8 decode step 31-33 ms
    instead of 18 on the 2-core bench VM. Returns False when torch's OpenMP runtime cannot be found (nothing
    changed). The runtime is located among the loaded libraries, since torch loads it privately."""
    torch.get_num_threads()   # torch sets each thread's OpenMP count lazily on first use: let it happen first
    runtime = _openmp_runtime()
    if runtime is None:
        return False
    runtime.omp_set_num_threads(1)
    return True


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith((".so.1", ".so", ".so.5"))}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            try:
                lib = ctypes.CDLL(path)   # already loaded: the same handle torch uses
                lib.omp_set_num_threads.argtypes = [_INT]
                return lib
            except (OSError, AttributeError):
                continue
    return None


class HugePageArena:
    """Bump allocator for read-mostly weight buffers on transparent huge pages (2 MiB, `madvise(MADV_HUGEPAGE)`).

    A batch-1 decode step streams every weight once; with 4 KiB pages the hardware prefetcher stops at each page
    boundary and the TLB misses every 4 KiB. On the bench machine the 97 int8 projections of GPT-2 medium took 13.0
    instead of 13.9 ms per step from huge pages (bench/RESULTS.md). Buffers are carved from anonymous mappings of
    `chunk` bytes (2 MiB aligned, 64-byte aligned slices), so a model's weights waste at most one chunk's tail; a
    mapping is unmapped when the last tensor carved from it is freed. Where the kernel refuses huge pages (THP
    `never`, non-Linux) the memory is ordinary memory."""

    def __init__(self, chunk: int = 64 << 20) -> None:
        self.chunk = chunk
        self._base: torch.Tensor | None = None
        self._used = 0

    def _map(self, nbytes: int) -> torch.Tensor:
        mapped = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # shared maps get no THP
        whole = torch.frombuffer(mapped, dtype=torch.int8)   # keeps `mapped` alive as long as a slice lives
        start = (-whole.data_ptr()) % HUGE_PAGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mapped.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
            except OSError as e:   # THP disabled: ordinary pages
                log.debug("madvise(MADV_HUGEPAGE) refused: %s", e)
        return whole[start:start + nbytes]

    def empty(self, nbytes: int) -> torch.Tensor:
        """An uninitialised 1-D int8 tensor of `nbytes`, 64-byte aligned."""
        if nbytes > self.chunk // 4:   # large buffers get their own mapping, rounded up to whole huge pages
            return self._map(-(-nbytes // HUGE_PAGE) * HUGE_PAGE)[:nbytes]
        if self._base is None or self._used + nbytes > self._base.numel():
            self._base, self._used = self._map(self.chunk), 0
        out = self._base[self._used:self._used + nbytes]
        self._used += -(-nbytes // 64) * 64
        return out


@dataclass(frozen=True, eq=False)
class Int8Kernel:
    """The compiled int8 linear (serving/kernels/int8_linear.c). `isa` is "avx512-vnni" or "portable"; both builds
    give bitwise equal results."""
    lib: ctypes.CDLL
    isa: str
    max_positions: int   # the longest cache `attention` takes (its scores live on the C stack)

    def __deepcopy__(self, memo: dict) -> "Int8Kernel":   # a loaded library is shared, never copied
        return self

    def pack(self, weight: torch.Tensor, arena: HugePageArena | None = None) -> torch.Tensor:
        """int8 weight [N, K] -> the kernel's packed layout (1-D int8, N rounded up to 64 times K rounded up to 4),
        allocated from `arena` when given."""
        n, k = weight.shape
        weight = weight.to(torch.int8).contiguous()
        size = int(self.lib.tm_packed_size(n, k))
        out = arena.empty(size) if arena is not None else torch.empty(size, dtype=torch.int8)
        self.lib.tm_pack_weights(weight.data_ptr(), n, k, out.data_ptr())
        return out

    def linear(self, x: torch.Tensor, packed: torch.Tensor, n: int, w_scale: torch.Tensor, w_sum: torch.Tensor,
               bias: torch.Tensor, threads: int | None = None, residual: torch.Tensor | None = None,
               gelu: bool = False) -> torch.Tensor:
        """y = W8A8(x) as in the C file's header: x [M, K] fp32 contiguous; w_scale, bias [N] fp32; w_sum [N] int32
        (row sums of the int8 weight); returns y [M, N] fp32. `threads`: `kernel_threads()` by default. Fused into
        the output: `residual` [M, N] fp32 contiguous added (y = residual + W x + b, a transformer block's skip
        connection), or `gelu` (tanh approximation, GPT-2's gelu_new) applied."""
        m, k = x.shape
        y = torch.empty(m, n)
        if residual is not None and (residual.shape != (m, n) or residual.dtype != torch.float32
                                     or not residual.is_contiguous()):
            raise ValueError(f"residual must be a contiguous fp32 tensor of shape ({m}, {n})")
        if m and self.lib.tm_int8_linear(x.data_ptr(), m, k, packed.data_ptr(), n, w_scale.data_ptr(),
                                         w_sum.data_ptr(), bias.data_ptr(), y.data_ptr(),
                                         None if residual is None else residual.data_ptr(), 1 if gelu else 0,
                                         threads or kernel_threads()):
            raise MemoryError(f"int8 linear: no memory for the quantized input ({m} x {k} bytes)")
        return y

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor | None,
                  threads: int | None = None) -> torch.Tensor | None:
        """Causal softmax(q kᵀ / sqrt(D)) v for the T newest positions of each row: q [B, H, T, D] is those
        positions' queries, keys/values [B, H, L, D] the cache through them (fp32 views, last dim contiguous, same
        strides); the query at position p of row b attends to [starts[b], p] (starts int64 [B], or None = 0), so left
        padding is skipped and T = 1 is a decode step. Returns [B, H, T, D] fp32 (zeros for padding queries), or None
        when L exceeds the kernel's limit (use torch's). ValueError for starts outside [0, L) or of the wrong
        dtype/shape."""
        b, h, t, d = q.shape
        end = keys.shape[2]
        if end > self.max_positions or keys.stride() != values.stride() or keys.stride(3) != 1 or q.stride(3) != 1:
            return None
        if starts is not None and (starts.dtype != torch.int64 or starts.shape != (b,) or not starts.is_contiguous()):
            raise ValueError(f"starts must be a contiguous int64 tensor of shape ({b},)")
        out = torch.empty(b, h, t, d)
        rc = self.lib.tm_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), keys.data_ptr(),
                                   values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
                                   None if starts is None else starts.data_ptr(), b, h, t, end, d, d ** -0.5,
                                   out.data_ptr(), threads or kernel_threads())
        if rc == -2:
            raise ValueError(f"every start must lie in [0, {end}) and 1 <= T <= {end}: starts "
                             f"{None if starts is None else starts.tolist()}, T = {t}")
        return out if rc == 0 else None


@functools.cache
def int8_kernel(portable: bool = False) -> Int8Kernel:
    """The int8 linear kernel compiled for this CPU (the VNNI build where `has_vnni()`, else portable C; `portable`
    forces the portable one). Compiled once per process (and cached on disk). Raises KernelBuildError."""
    vnni = not portable and has_vnni()
    flags, libs = (_VNNI_CFLAGS, tuple(_VNNI_LIBS)) if vnni else (["-DTM_PORTABLE"], ("-lm",))
    path = build(SOURCE, flags, libs)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:   # a cached file that does not load (truncated, foreign): drop it, the next load rebuilds
        path.unlink(missing_ok=True)
        raise KernelBuildError(f"cannot load {path}: {e}") from e
    lib.tm_packed_size.argtypes, lib.tm_packed_size.restype = [_I64, _I64], _I64
    lib.tm_pack_weights.argtypes, lib.tm_pack_weights.restype = [_P, _I64, _I64, _P], None
    lib.tm_int8_linear.argtypes = [_P, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _INT, _INT]
    lib.tm_int8_linear.restype = _INT
    lib.tm_isa.restype = _INT
    lib.tm_attention.argtypes = [_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                                 ctypes.c_float, _P, _INT]
    lib.tm_attention.restype = _INT
    lib.tm_max_positions.restype = _I64
    isa = "avx512-vnni" if lib.tm_isa() == 1 else "portable"
    if vnni and isa != "avx512-vnni":
        raise KernelBuildError("the compiler did not enable AVX-512 VNNI for int8_linear.c")
    return Int8Kernel(lib, isa, int(lib.tm_max_positions()))


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
