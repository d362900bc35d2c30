"""Counter-based Gaussian weight noise for the fused CPU backend (numba).

``W + σ·a·ξ`` with ``ξ`` standard normal per element, where element ``e`` of the
flattened weight takes its value from Philox4x32-10 (Salmon et al., SC 2011) at
counter ``e // 4`` under the 64-bit key ``seed``: a pure function of ``(seed, e)``.
So the weight is cut into fixed chunks that threads take in any order, and the noise
is identical for any thread count; a new seed per layer and step gives an independent
stream (Philox's counters never overlap across keys).

Each Philox block gives four uint32 words → two Box–Muller pairs.  numba has no
vectorized libm here (no SVML), so ``log`` and ``sin/cos`` are written out as
branch-free float32 polynomials that LLVM vectorizes: ``log`` from the float's exponent
and a degree-9 series in ``(m−1)/(m+1)`` (|error| < 1e-7 relative), the angle as a
quadrant (2 bits) and a uniform offset in [−π/4, π/4) (degree-9 / -8 Taylor series,
error < 4e-7).  ``u₁ = (k + 1)·2⁻²⁴`` with 24 random bits ``k``, so |ξ| ≤ 5.77: the
normal's mass beyond that is 8e-9.  The torch backend (the oracle) keeps
``torch.randn``; the two agree in distribution, not bitwise (tests/kernels/test_philox.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["add_gaussian_noise", "normal_stream"]

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)

CHUNK = 4096
"""Elements per chunk (a multiple of 4): the unit of work a thread takes."""


@njit(nogil=True, cache=True, inline="always")
def _philox(c0, c1, k0, k1):  # pragma: no cover - jitted
    # Philox4x32-10 of the counter (c0, c1, 0, 0) under key (k0, k1); all uint64 < 2**32.
    c2 = np.uint64(0)
    c3 = np.uint64(0)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        n0 = ((p1 >> _S32) ^ c1 ^ k0) & _LO
        n1 = p1 & _LO
        n2 = ((p0 >> _S32) ^ c3 ^ k1) & _LO
        n3 = p0 & _LO
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + _W0) & _LO
        k1 = (k1 + _W1) & _LO
    return c0, c1, c2, c3


@njit(nogil=True, cache=True)
def _uniforms(block0, k0, k1, u, q):  # pragma: no cover - jitted
    # Block b of the chunk gives the pairs b and Q + b (Q = blocks per chunk): u ∈ (0, 1]
    # (the radius) from words 0 and 2, the angle's bits q from words 1 and 3.  Contiguous
    # stores and int32 conversions, so that LLVM vectorizes the loop.
    blocks = u.shape[0] // 2
    for b in range(blocks):
        blk = np.uint64(block0 + b)
        r0, r1, r2, r3 = _philox(blk & _LO, blk >> _S32, k0, k1)
        u[b] = np.float32(np.int32(r0 >> np.uint64(8)) + np.int32(1)) * np.float32(2.0**-24)
        u[blocks + b] = np.float32(np.int32(r2 >> np.uint64(8)) + np.int32(1)) * np.float32(
            2.0**-24
        )
        q[b] = np.int32(r1 >> np.uint64(2))
        q[blocks + b] = np.int32(r3 >> np.uint64(2))


# error_model="numpy": no ZeroDivisionError check, which stops vectorization.
@njit(nogil=True, cache=True, fastmath={"contract"}, error_model="numpy")
def _box_muller(u, ubits, q, z):  # pragma: no cover - jitted
    # z[p], z[P + p] = r·(cos θ, sin θ), r = sqrt(−2 ln u[p]), P pairs; ubits: u as int32;
    # q[p]: 30 random bits of the angle (2 for the quadrant, 28 for the offset).
    pairs = u.shape[0]
    ln2 = np.float32(0.6931471805599453)
    sqrt2 = np.float32(1.4142135623730951)
    half_pi = np.float32(1.5707963267948966)
    for p in range(pairs):
        bits = ubits[p]
        # Every int → float conversion goes through an explicit int32: numba computes
        # integer arithmetic in int64, and AVX2 cannot vectorize int64 → float32.
        e = np.float32(np.int32((bits >> 23) - 127))
        m = np.float32(1.0) + np.float32(np.int32(bits & 0x7FFFFF)) * np.float32(2.0**-23)
        big = np.float32(m > sqrt2)  # arithmetic blends, not selects: LLVM vectorizes them
        m = m * (np.float32(1.0) - np.float32(0.5) * big)
        e = e + big
        t = (m - np.float32(1.0)) / (m + np.float32(1.0))
        t2 = t * t
        poly = np.float32(1.0) + t2 * (
            np.float32(1 / 3)
            + t2 * (np.float32(1 / 5) + t2 * (np.float32(1 / 7) + t2 * np.float32(1 / 9)))
        )
        ln_u = e * ln2 + np.float32(2.0) * t * poly
        r = np.sqrt(np.abs(np.float32(-2.0) * ln_u))  # ln_u <= 0; abs: no branch
        bq = q[p]
        quadrant = np.int32(bq >> 28)
        f = np.float32(np.int32(bq & 0xFFFFFFF)) * np.float32(2.0**-28)  # [0, 1)
        a = (f - np.float32(0.5)) * half_pi  # [−π/4, π/4)
        a2 = a * a
        s = a * (
            np.float32(1.0)
            - a2 * (np.float32(1 / 6) - a2 * (np.float32(1 / 120) - a2 * (
                np.float32(1 / 5040) - a2 * np.float32(1 / 362880))))
        )  # fmt: skip
        c = np.float32(1.0) - a2 * (
            np.float32(0.5) - a2 * (np.float32(1 / 24) - a2 * (
                np.float32(1 / 720) - a2 * np.float32(1 / 40320)))
        )  # fmt: skip
        odd = np.float32(np.int32(quadrant & 1))
        x = c + odd * (s - c)
        y = s + odd * (c - s)
        # signs: x < 0 in quadrants 1, 2; y < 0 in quadrants 2, 3
        sx = np.float32(1.0) - np.float32(2.0) * np.float32(np.int32(((quadrant + 1) >> 1) & 1))
        sy = np.float32(1.0) - np.float32(2.0) * np.float32(np.int32(quadrant >> 1))
        z[p] = r * sx * x
        z[pairs + p] = r * sy * y


@njit(nogil=True, cache=True)
def _chunk_normals(chunk, k0, k1, z):  # pragma: no cover - jitted
    pairs = CHUNK // 2
    u = np.empty(pairs, np.float32)
    q = np.empty(pairs, np.int32)
    _uniforms(chunk * (CHUNK // 4), k0, k1, u, q)
    _box_muller(u, u.view(np.int32), q, z)


@njit(nogil=True, cache=True, error_model="numpy")
def _add_noise(w, scale, edges, k0, k1, out, c_lo, c_hi):  # pragma: no cover - jitted
    # Chunks c_lo:c_hi of out[i, j] = w[i, j] + scale[s, i] · ξ[i·cols + j], tile s holding
    # the columns edges[s]:edges[s + 1].
    rows, cols = w.shape
    n = rows * cols
    wf = w.reshape(n)
    of = out.reshape(n)
    z = np.empty(CHUNK, np.float32)
    for c in range(c_lo, c_hi):
        _chunk_normals(c, k0, k1, z)
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        e = lo
        while e < hi:  # one (row, tile) segment at a time: a vectorized inner loop
            i = e // cols
            j = e - i * cols
            t = 0
            while edges[t + 1] <= j:
                t += 1
            stop = min(hi, i * cols + edges[t + 1])
            sc = scale[t, i]
            for f in range(e, stop):
                of[f] = wf[f] + sc * z[f - lo]
            e = stop


_POOL: list = []
_PARALLEL_MIN = 1 << 18
"""Below this many elements one thread is faster than handing out chunks."""


def _run_chunks(kernel, args: tuple, n: int, threads: int) -> None:
    """``kernel(*args, c_lo, c_hi)`` over all chunks, split into ``threads`` contiguous
    ranges run concurrently (the kernels release the GIL)."""
    chunks = (n + CHUNK - 1) // CHUNK
    if threads <= 1 or n < _PARALLEL_MIN:
        kernel(*args, 0, chunks)
        return
    from concurrent.futures import ThreadPoolExecutor

    if not _POOL or _POOL[0]._max_workers < threads:
        _POOL[:] = [ThreadPoolExecutor(max_workers=threads, thread_name_prefix="afm-noise")]
    step = -(-chunks // threads)
    jobs = [
        _POOL[0].submit(kernel, *args, lo, min(chunks, lo + step)) for lo in range(0, chunks, step)
    ]
    for job in jobs:
        job.result()


def _key(seed: int) -> tuple[np.uint64, np.uint64]:
    seed = int(seed) & ((1 << 64) - 1)
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


def normal_stream(n: int, seed: int, threads: int = 1) -> np.ndarray:
    """The first ``n`` standard normals of the stream ``seed`` (fp32), on ``threads``."""
    weight = np.zeros((1, n), np.float32)
    edges = np.array([0, n], np.int64)
    return add_gaussian_noise(weight, np.ones((1, 1), np.float32), edges, seed, threads)[0]


def add_gaussian_noise(
    weight: np.ndarray, scale: np.ndarray, edges: np.ndarray, seed: int, threads: int = 1
) -> np.ndarray:
    """``weight + scale[s, i] · ξ`` for a C-contiguous fp32 ``[N, K]`` weight, with ``ξ``
    the stream ``seed`` over the flattened weight; ``scale`` is ``[S, N]`` fp32 (σ·a per
    tile and row) and tile ``s`` holds the columns ``edges[s]:edges[s + 1]``."""
    out = np.empty_like(weight)
    _run_chunks(_add_noise, (weight, scale, edges, *_key(seed), out), weight.size, threads)
    return out
