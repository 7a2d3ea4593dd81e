"""Pure functions that decide which sample every rank and loader worker reads, and in which order.

The epoch's sample order G is a *global* permutation, independent of the number of ranks and workers:

1. shards are permuted by (seed, epoch);
2. their samples are concatenated in that order (concat index c);
3. positions are permuted block-wise: position p in block b = p // S maps to c = b*S + perm_{seed,epoch,b}[p % S]
   (S = `shuffle_buffer`; a deterministic stand-in for a streaming shuffle buffer).

G is never materialised (JFT: 300M samples); a worker maps only its own positions, one batch at a time.

A *segment* runs the rest of an epoch with one (world, workers, batch, drop_last) setting. It cuts the remaining
sequence R (intervals of G positions) into `world` contiguous rank parts of T*batch positions (so a rank reads few
shards), each cut into contiguous per-worker parts; rank batch t is served by virtual worker (t + phase) % workers.
Equal batch counts: drop_last drops < world*batch trailing positions; otherwise R is padded with copies of its first
positions (< world*batch, marked as padding). After `consumed` batches per rank, the unseen positions of every part
(plus the dropped tail) form the next R, so a resume continues with exactly the unseen samples - with the same world
it reproduces the uninterrupted run batch for batch, with another world it re-splits them (elastic).

A weighted mix of sources (`MixOrder`) changes only what a G position means: positions are dealt to the sources
by an exact stratified interleave (`interleave`, quotas from `apportion`), and a source's k-th position of the
epoch continues its own sequence of passes, each pass one `GlobalOrder` of its shards. Everything above (rank
parts, padding, resume, elastic) works on the positions and holds unchanged.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np


class Seq:
    """A sequence of G positions stored as intervals [start, start+len), each flagged as padding or not."""

    __slots__ = ("starts", "lens", "pad", "cum")

    def __init__(self, starts, lens, pad):
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lens = np.asarray(lens, dtype=np.int64)
        self.pad = np.asarray(pad, dtype=bool)
        keep = self.lens > 0
        if not keep.all():
            self.starts, self.lens, self.pad = self.starts[keep], self.lens[keep], self.pad[keep]
        self.cum = np.concatenate([[0], np.cumsum(self.lens)])

    @classmethod
    def range(cls, n: int) -> "Seq":
        return cls([0], [n], [False])

    def __len__(self) -> int:
        return int(self.cum[-1])

    @property
    def num_pad(self) -> int:
        return int(self.lens[self.pad].sum())

    def slice(self, a: int, b: int) -> "Seq":
        """Positions [a, b) of this sequence (O(log n + k) with k intervals touched)."""
        a, b = max(0, a), min(len(self), b)
        if b <= a:
            return Seq([], [], [])
        i = int(np.searchsorted(self.cum, a, side="right")) - 1
        j = int(np.searchsorted(self.cum, b, side="left"))
        starts = self.starts[i:j].copy()
        lens = self.lens[i:j].copy()
        head = a - self.cum[i]
        starts[0] += head
        lens[0] -= head
        lens[-1] -= self.cum[j] - b
        return Seq(starts, lens, self.pad[i:j])

    def take(self, a: np.ndarray, b: np.ndarray) -> "Seq":
        """Concatenation of the sub-sequences [a[i], b[i]) (vectorised `slice` for many ranges at once)."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        keep = b > a
        a, b = a[keep], b[keep]
        if len(a) == 0:
            return Seq([], [], [])
        i0 = np.searchsorted(self.cum, a, side="right") - 1
        i1 = np.searchsorted(self.cum, b, side="left") - 1
        pieces = i1 - i0 + 1
        rng = np.repeat(np.arange(len(a)), pieces)
        idx = np.repeat(i0, pieces) + (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces))
        lo = np.maximum(a[rng], self.cum[idx])
        hi = np.minimum(b[rng], self.cum[idx + 1])
        return Seq(self.starts[idx] + (lo - self.cum[idx]), hi - lo, self.pad[idx])

    def strip_pad(self) -> "Seq":
        return Seq(self.starts[~self.pad], self.lens[~self.pad], np.zeros(int((~self.pad).sum()), bool))

    def as_pad(self) -> "Seq":
        return Seq(self.starts, self.lens, np.ones(len(self.starts), bool))

    @staticmethod
    def concat(parts: list["Seq"]) -> "Seq":
        if not parts:
            return Seq([], [], [])
        return Seq(np.concatenate([p.starts for p in parts]), np.concatenate([p.lens for p in parts]),
                   np.concatenate([p.pad for p in parts]))

    def positions(self) -> np.ndarray:
        """All positions as one array (only for small sequences: a batch)."""
        if len(self.starts) == 0:
            return np.zeros(0, np.int64)
        rep = np.repeat(self.starts - self.cum[:-1], self.lens)
        return rep + np.arange(len(self), dtype=np.int64)

    def intervals(self) -> list[tuple[int, int, bool]]:
        return [(int(s), int(s + n), bool(p)) for s, n, p in zip(self.starts, self.lens, self.pad)]


@dataclass(frozen=True)
class Segment:
    """One stretch of an epoch run with a fixed layout; `consumed` = batches each rank has taken in it."""

    world: int
    workers: int
    batch: int
    drop_last: bool
    phase: int = 0
    consumed: int = 0

    def layout_key(self) -> tuple:
        return (self.world, self.workers, self.batch, self.drop_last, self.phase)

    def to_list(self) -> list[int]:
        return [int(x) for x in astuple(self)]

    @classmethod
    def from_list(cls, v) -> "Segment":
        w, n, b, d, p, c = v
        return cls(world=int(w), workers=int(n), batch=int(b), drop_last=bool(d), phase=int(p), consumed=int(c))


def count_mod(lo: int, hi: int, n: int, v: int) -> int:
    """How many integers t in [lo, hi) have t % n == v."""

    def upto(x: int) -> int:  # integers in [0, x) congruent to v
        return max(0, (x - v + n - 1) // n)

    return upto(hi) - upto(lo)


def use_sequence(R: Seq, world: int, batch: int, drop_last: bool) -> tuple[Seq, int, Seq]:
    """(the padded/truncated sequence the segment reads, batches per rank T, dropped tail)."""
    gb = world * batch
    if drop_last:
        R = R.strip_pad() if R.num_pad else R
        T = len(R) // gb
        return R.slice(0, T * gb), T, R.slice(T * gb, len(R))
    if len(R) % gb == 0 and R.num_pad < gb:
        return R, len(R) // gb, Seq([], [], [])  # e.g. an unchanged layout after resume: keep its padding
    R = R.strip_pad() if R.num_pad else R
    T = -(-len(R) // gb)
    need, pads = T * gb - len(R), []
    while need > 0:  # cyclic copies of the first positions (more than one lap only for tiny datasets)
        take = min(need, len(R))
        pads.append(R.slice(0, take).as_pad())
        need -= take
    return Seq.concat([R, *pads]), T, Seq([], [], [])


def worker_part(used: Seq, T: int, rank: int, vworker: int, seg: Segment) -> Seq:
    """The positions virtual worker `vworker` of `rank` reads in a segment, in order (its batches back to back)."""
    B, n = seg.batch, seg.workers
    rank_part = used.slice(rank * T * B, (rank + 1) * T * B)
    off = sum(count_mod(seg.phase, T + seg.phase, n, u) for u in range(vworker))
    mine = count_mod(seg.phase, T + seg.phase, n, vworker)
    return rank_part.slice(off * B, (off + mine) * B)


def remaining(R: Seq, seg: Segment) -> Seq:
    """The positions of R not yet consumed after `seg.consumed` batches on every rank."""
    used, T, tail = use_sequence(R, seg.world, seg.batch, seg.drop_last)
    k, B, n = min(seg.consumed, T), seg.batch, seg.workers
    sizes = np.array([count_mod(seg.phase, T + seg.phase, n, v) for v in range(n)], np.int64)  # batches per worker
    done = np.array([count_mod(seg.phase, k + seg.phase, n, v) for v in range(n)], np.int64)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    base = (np.arange(seg.world, dtype=np.int64) * T * B)[:, None]  # rank r, worker v: [base + off, +size)
    a = (base + (offs + done)[None, :] * B).reshape(-1)
    b = (base + (offs + sizes)[None, :] * B).reshape(-1)
    return Seq.concat([used.take(a, b), tail])


def segment_sequence(total: int, history: list[Segment]) -> Seq:
    """The epoch's remaining sequence after replaying the finished segments in `history`."""
    R = Seq.range(total)
    for seg in history:
        R = remaining(R, seg)
    return R


def next_phase(prev: Segment, workers: int) -> int:
    """Phase of a segment following `prev`: keeps the round-robin alignment when the worker count is unchanged."""
    return (prev.phase + prev.consumed) % workers if workers == prev.workers else 0


def shard_permutation(num_shards: int, seed: int, epoch: int, shuffle: bool = True,
                      salt: tuple[int, ...] = ()) -> np.ndarray:
    """The epoch's shard order (a pure function of seed, epoch and `salt`, e.g. a source index)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x5EED, *salt]).permutation(num_shards)


class GlobalOrder:
    """Maps G positions of one epoch to (shard index, sample index within the shard).

    `salt` makes independent orders of one seed (the sources of a mix). `replace=True` draws each position's
    sample uniformly *with replacement* from its shuffle block instead of permuting the block (shard locality is
    kept; a sample can occur 0, 1 or more times per pass)."""

    def __init__(self, counts, seed: int, epoch: int, block: int, shuffle: bool = True,
                 salt: tuple[int, ...] = (), replace: bool = False):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.block, self.shuffle = seed, epoch, block, shuffle
        self.salt, self.replace = tuple(salt), replace
        self.shard_perm = shard_permutation(len(self.counts), seed, epoch, shuffle, self.salt)
        self.cum = np.concatenate([[0], np.cumsum(self.counts[self.shard_perm])])
        self.total = int(self.cum[-1])
        self._perms: dict[int, np.ndarray] = {}

    def _block_perm(self, b: int) -> np.ndarray:
        p = self._perms.get(b)
        if p is None:
            n = min(self.block, self.total - b * self.block)
            rng = np.random.default_rng([self.seed, self.epoch, b, 0xB10C, *self.salt])
            p = rng.integers(0, n, size=n) if self.replace else rng.permutation(n)
            if len(self._perms) >= 8:
                self._perms.pop(next(iter(self._perms)))
            self._perms[b] = p
        return p

    def concat_index(self, pos: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        blocks = pos // self.block
        for b in np.unique(blocks):
            m = blocks == b
            out[m] = b * self.block + self._block_perm(int(b))[pos[m] - b * self.block]
        return out

    def lookup(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sample index in shard) for each position."""
        c = self.concat_index(np.asarray(pos, dtype=np.int64))
        slot = np.searchsorted(self.cum, c, side="right") - 1
        return self.shard_perm[slot], c - self.cum[slot]


def apportion(total: int, weights) -> np.ndarray:
    """Integer shares of `total` proportional to `weights` (largest remainder; ties to the lower index): they sum
    to `total` exactly and each differs from total * w / sum(w) by less than 1."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * (w / w.sum())
    base = np.floor(exact).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        base[np.argsort(-(exact - base), kind="stable")[:short]] += 1
    return base


def interleave(c, quotas) -> tuple[np.ndarray, np.ndarray]:
    """(source, k): concat index c of a mix epoch holds the k-th sample of `source` this epoch.

    Hierarchical stratification, exact in integers: source 0 owns index c of the M = sum(quotas) indices iff
    floor((c+1) n0 / M) > floor(c n0 / M) (so it owns exactly n0, evenly spread, and floor(c n0 / M) of the first
    c); the other indices, renumbered, are split the same way between source 1 and the rest, and so on. Any prefix
    of x indices holds x * n_j / M of source j within +-(j+1), any window within +-2(j+1): every batch is a
    stratified sample of the mix. Pure and vectorised: a worker maps only its own batch."""
    c = np.array(c, dtype=np.int64, copy=True)
    quotas = np.asarray(quotas, dtype=np.int64)
    src = np.full(c.shape, len(quotas) - 1, dtype=np.int64)
    k = c.copy()
    open_ = np.ones(c.shape, dtype=bool)
    m = int(quotas.sum())
    for j, n in enumerate(quotas[:-1].tolist()):
        if m <= 0:
            break
        idx = np.flatnonzero(open_)
        cj = k[idx]
        lo, hi = (cj * n) // m, ((cj + 1) * n) // m
        mine = hi > lo
        src[idx[mine]], k[idx[mine]] = j, lo[mine]
        open_[idx[mine]] = False
        k[idx[~mine]] = cj[~mine] - lo[~mine]  # rank among the indices not owned by sources <= j
        m -= n
    return src, k


class MixOrder:
    """Maps G positions of one epoch of a weighted mix to (shard, sample index in shard, pass).

    Source i holds `sizes[i]` samples and gets `quotas[i]` positions per epoch, placed by `interleave`. Its k-th
    sample of epoch e is number v = e * quota + k of its own endless sequence of passes: pass q = v // size, in the
    pass's own order (a `GlobalOrder` of its shards seeded by (seed, q, i)), position v % size. So a source is read
    without replacement: every sample once per pass, passes continuing across epochs (a sample occurs
    floor or ceil of quota / size times per epoch). Shard indices are global (source i's are offset by
    `offsets[i]`). One source with quota == size is exactly `GlobalOrder(counts, seed, epoch)` (pass == epoch)."""

    def __init__(self, counts: list, offsets, quotas, seed: int, epoch: int, block: int, shuffle: bool = True,
                 replace=None):
        self.counts = [np.asarray(c, dtype=np.int64) for c in counts]
        self.sizes = np.array([int(c.sum()) for c in self.counts], dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.quotas = np.asarray(quotas, dtype=np.int64)
        if ((self.sizes <= 0) & (self.quotas > 0)).any():
            raise ValueError("MixOrder: a source with a quota has no samples")
        self.seed, self.epoch, self.block, self.shuffle = seed, epoch, block, shuffle
        self.replace = list(replace) if replace is not None else [False] * len(self.counts)
        self.total = int(self.quotas.sum())
        self._orders: dict[tuple[int, int], GlobalOrder] = {}

    def _order(self, i: int, q: int) -> GlobalOrder:
        g = self._orders.get((i, q))
        if g is None:
            salt = (i,) if len(self.counts) > 1 else ()  # one source: the plain stream's order, bit for bit
            g = GlobalOrder(self.counts[i], self.seed, q, self.block, self.shuffle, salt, self.replace[i])
            if len(self._orders) >= 16:
                self._orders.pop(next(iter(self._orders)))
            self._orders[(i, q)] = g
        return g

    def locate(self, pos) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global shard index, sample index in shard, pass of its source) for each position."""
        src, k = interleave(np.asarray(pos, dtype=np.int64), self.quotas)
        v = self.epoch * self.quotas[src] + k
        size = np.maximum(self.sizes[src], 1)
        q, r = v // size, v % size
        shard, idx = np.empty_like(r), np.empty_like(r)
        for i, qq in {(int(a), int(b)) for a, b in zip(src.tolist(), q.tolist())}:
            m = (src == i) & (q == qq)
            s, j = self._order(i, qq).lookup(r[m])
            shard[m], idx[m] = s + self.offsets[i], j
        return shard, idx, q

    def lookup(self, pos) -> tuple[np.ndarray, np.ndarray]:
        """(global shard index, sample index in shard), as `GlobalOrder.lookup`."""
        shard, idx, _ = self.locate(pos)
        return shard, idx


def batch_positions(used: Seq, T: int, rank: int, seg: Segment, t: int, cache: dict | None = None) -> np.ndarray:
    """Positions of batch t (0 <= t < T) of `rank` in a segment: virtual worker (t + phase) % workers, its
    local batch number count_mod(...). Any loader worker can compute any batch: assignment is by arithmetic.
    `cache` (a dict owned by the caller, one per segment) keeps the worker parts between batches."""
    n, B = seg.workers, seg.batch
    v = (t + seg.phase) % n
    local = count_mod(seg.phase, t + seg.phase, n, v)
    part = None if cache is None else cache.get(v)
    if part is None:
        part = worker_part(used, T, rank, v, seg)
        if cache is not None:
            cache[v] = part
    return part.slice(local * B, (local + 1) * B).positions()


def rank_batch_positions(used: Seq, T: int, rank: int, seg: Segment, consumed: int = 0) -> list[np.ndarray]:
    """The positions of each remaining batch of `rank`, in the order the rank receives them."""
    return [batch_positions(used, T, rank, seg, t) for t in range(consumed, T)]
