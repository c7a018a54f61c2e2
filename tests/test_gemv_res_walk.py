"""The index walk of cuda/gemm_a8w4.cu gemm_a8w4_gemv_res, emulated on the CPU (as
tests/test_decode_attention.py emulates the decode kernels' maps): each warp's load cursor (row tile
lt of its block's sequence, first chunk lc of a batch of U chunks, advanced a batch at a time and
moved gridDim.x row tiles on past a tile's last pair) feeds two register batches that the pair loop
computes. Every (row tile, chunk) must be computed exactly once, by the warp that owns the chunk,
from the loads of that same (row tile, chunk). The GPU tests (tests/test_gemv_decode_gpu.py) hold
the kernel's output to the landed GEMV's bits."""
import collections
import itertools

import pytest


def walk(C: int, R: int, grid: int, NW: int = 8, U: int = 2) -> collections.Counter:
    """(row tile, chunk) -> times computed, following the kernel's statements in order."""
    SPAN = NW * U
    pairs = (C + 2 * SPAN - 1) // (2 * SPAN)
    done = collections.Counter()
    for bx in range(grid):
        tiles = (R - bx + grid - 1) // grid
        for warp in range(NW):
            lt, lc, lend = 0, warp, warp + 2 * SPAN * pairs

            def load(c0=None):               # load_w / load_x: what a batch's U slots hold (None: zeros)
                c0 = lc if c0 is None else c0
                return [(bx + lt * grid, c0 + NW * u) if lt < tiles and c0 + NW * u < C else None for u in range(U)]

            def advance():
                nonlocal lt, lc
                lc += SPAN
                if lc >= lend:
                    lc, lt = warp, lt + 1
            b0 = load()                      # before the PDL wait: the weights of the first two batches
            advance()
            b1 = load()
            assert load(warp) == b0          # after it, their x (the same slots)
            assert load(warp + SPAN) == b1
            advance()
            for it in range(tiles):
                rt = bx + it * grid
                for p in range(pairs):
                    c0 = warp + 2 * SPAN * p
                    for buf, cc in ((b0, c0), (b1, c0 + SPAN)):
                        for u in range(U):
                            if cc + NW * u >= C:
                                break
                            assert buf[u] == (rt, cc + NW * u), (bx, warp, it, p, buf)
                            assert (cc + NW * u) % NW == warp
                            done[buf[u]] += 1
                        if buf is b0:
                            b0 = load()
                        else:
                            b1 = load()
                        advance()
    return done


@pytest.mark.parametrize("C,R,grid", [c for c in itertools.product(
    (1, 10, 16, 24, 32, 36, 64, 128, 172), (1, 2, 7, 257, 768), (1, 2, 7, 100, 528)) if c[2] <= c[1]])
def test_every_row_tile_and_chunk_is_computed_once_from_its_own_loads(C, R, grid):
    done = walk(C, R, grid)
    assert set(done) == {(r, c) for r in range(R) for c in range(C)}
    assert set(done.values()) == {1}
