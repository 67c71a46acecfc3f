"""ggml-alloc's graph allocator (ggml_gallocr_alloc_graph_impl and ggml_dyn_tallocr), in Python.

Sizes may be plain ints or `Affine` values: a size known at one context (n0 cells) together with how
it grows per cell. With affine sizes the allocator runs once and also reports the range of contexts
over which every decision it took (best fit, block merges, the running maximum) stays the same; inside
that range each buffer size is exactly c + s·(n - n0), so later questions need no replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction

from llamalaunch.model.ggml.sim import FLAG_INPUT, FLAG_OUTPUT, INPLACE_OPS, Tensor

_HUGE = 1 << 62


class Range:
    """The contexts (cells) for which the recorded comparisons keep their outcome."""

    def __init__(self, n0: int) -> None:
        self.n0 = n0
        self.lo: Fraction | float = float("-inf")
        self.hi: Fraction | float = float("inf")

    def keep_sign(self, c: int, s: int) -> None:
        """d(n) = c + s·(n - n0) must keep the sign it has at n0."""
        if s == 0:
            return
        if c == 0:
            self.lo, self.hi = max(self.lo, self.n0), min(self.hi, self.n0)
            return
        root = self.n0 - Fraction(c, s)  # where d crosses zero
        if root > self.n0:
            self.hi = min(self.hi, root - Fraction(1, 2))
        else:
            self.lo = max(self.lo, root + Fraction(1, 2))


class Affine:
    """c + s·(n - n0), compared by its value at n0; every comparison narrows the shared Range."""

    __slots__ = ("c", "range", "s")

    def __init__(self, c: int, s: int, range_: Range) -> None:
        self.c = c
        self.s = s
        self.range = range_

    def _other(self, other: Affine | int) -> tuple[int, int]:
        return (other.c, other.s) if isinstance(other, Affine) else (other, 0)

    def __add__(self, other: Affine | int) -> Affine:
        c, s = self._other(other)
        return Affine(self.c + c, self.s + s, self.range)

    __radd__ = __add__

    def __sub__(self, other: Affine | int) -> Affine:
        c, s = self._other(other)
        return Affine(self.c - c, self.s - s, self.range)

    def __rsub__(self, other: int) -> Affine:
        return Affine(other - self.c, -self.s, self.range)

    def _diff(self, other: Affine | int) -> int:
        c, s = self._other(other)
        self.range.keep_sign(self.c - c, self.s - s)
        return self.c - c

    def __lt__(self, other: Affine | int) -> bool:
        return self._diff(other) < 0

    def __le__(self, other: Affine | int) -> bool:
        return self._diff(other) <= 0

    def __gt__(self, other: Affine | int) -> bool:
        return self._diff(other) > 0

    def __ge__(self, other: Affine | int) -> bool:
        return self._diff(other) >= 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (Affine, int)) and self._diff(other) == 0

    def __hash__(self) -> int:
        return hash((self.c, self.s))


def _aligned(size: int | Affine, alignment: int) -> int | Affine:
    """Pad to the alignment. Context-dependent parts grow in whole aligned steps (cells come in 256s)."""
    if isinstance(size, Affine):
        return Affine((size.c + alignment - 1) // alignment * alignment, size.s, size.range)
    return (size + alignment - 1) // alignment * alignment


class DynAlloc:
    """ggml_dyn_tallocr with one chunk: best fit over the free blocks, the last block grows the buffer."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[list[int | Affine]] = [[0, _HUGE]]  # [offset, size], sorted by offset
        self.max_size: int | Affine = 0

    def alloc(self, size: int | Affine) -> int | Affine:
        size = _aligned(size, self.alignment)
        best = -1
        best_size: int | Affine = _HUGE
        for i in range(len(self.blocks) - 1):
            block_size = self.blocks[i][1]
            if block_size >= size and block_size <= best_size:
                best, best_size = i, block_size
        if best == -1:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        offset = block[0]
        block[0] = block[0] + size
        block[1] = block[1] - size
        if block[1] == 0:
            del self.blocks[best]
        end = offset + size
        self.max_size = max(self.max_size, end)  # compares end > max_size, as ggml does
        return offset

    def free(self, offset: int | Affine, size: int | Affine) -> None:
        size = _aligned(size, self.alignment)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == offset:
                block[1] = block[1] + size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] = block[1] + blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] = block[1] + size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] = blocks[i - 1][1] + block[1]
                    del blocks[i]
                return
        position = 0
        while position < len(blocks) and blocks[position][0] < offset:
            position += 1
        blocks.insert(position, [offset, size])


class _Node:
    __slots__ = ("allocated", "buffer", "n_children", "n_views", "offset")

    def __init__(self) -> None:
        self.n_children = 0
        self.n_views = 0
        self.buffer = -1
        self.offset: int | Affine = 0
        self.allocated = False


def same_layout(a: Tensor, b: Tensor) -> bool:
    return a.type == b.type and a.ne == b.ne and a.nb == b.nb


SizeFn = Callable[[Tensor, int], "int | Affine"]  # (tensor, buffer index) -> allocation size
LayoutFn = Callable[[Tensor, Tensor], bool]


class GraphAllocator:
    """ggml_gallocr_alloc_graph_impl: allocation order, in-place reuse, freeing at the last use."""

    def __init__(self, alignments: Sequence[int], bufts: Sequence[str], size: SizeFn,
                 layout: LayoutFn = same_layout) -> None:
        self.size = size
        self.layout = layout
        self.tallocs: list[DynAlloc] = []
        by_buft: dict[str, DynAlloc] = {}
        for alignment, buft in zip(alignments, bufts):
            by_buft.setdefault(buft, DynAlloc(alignment))
            self.tallocs.append(by_buft[buft])
        self.hash: dict[int, _Node] = {}

    def get(self, tensor: Tensor) -> _Node:
        node = self.hash.get(tensor.id)
        if node is None:
            node = self.hash[tensor.id] = _Node()
        return node

    def is_allocated(self, tensor: Tensor) -> bool:
        return (tensor.buffer is not None or (tensor.view_src is not None and tensor.view_src.buffer is not None)
                or self.get(tensor).allocated)

    def allocate(self, tensor: Tensor, buffer: int) -> None:
        if self.is_allocated(tensor) or tensor.view_src is not None:
            return
        hn = self.get(tensor)
        hn.allocated = True
        if tensor.op in INPLACE_OPS:
            for parent in tensor.src:
                if parent is None or parent.view_src is not None or not self.get(parent).allocated:
                    continue
                if parent.flags & FLAG_OUTPUT or not self.layout(tensor, parent):
                    continue
                p_hn = self.get(parent)
                if p_hn.n_children == 1 and p_hn.n_views == 0:
                    hn.buffer, hn.offset = p_hn.buffer, p_hn.offset
                    p_hn.allocated = False
                    self._free_extra(tensor, parent, hn, p_hn)
                    return
        hn.buffer = buffer
        hn.offset = self.tallocs[buffer].alloc(self.size(tensor, buffer))

    def _free_extra(self, tensor: Tensor, parent: Tensor, hn: _Node, p_hn: _Node) -> None:
        talloc = self.tallocs[p_hn.buffer]
        parent_size = _aligned(self.size(parent, p_hn.buffer), talloc.alignment)
        node_size = _aligned(self.size(tensor, hn.buffer), talloc.alignment)
        if parent_size > node_size:
            talloc.free(p_hn.offset + node_size, parent_size - node_size)

    def free(self, tensor: Tensor) -> None:
        if tensor.flags & FLAG_OUTPUT:
            return
        hn = self.get(tensor)
        self.tallocs[hn.buffer].free(hn.offset, self.size(tensor, hn.buffer))
        hn.allocated = False

    def run(self, nodes: Sequence[tuple[Tensor, int]], leafs: Sequence[tuple[Tensor, int]]) -> list[int | Affine]:
        for leaf, buffer in leafs:
            self.allocate(leaf, buffer)
        for node, buffer in nodes:
            if node.view_src is not None and node.op != "NONE":
                self.get(node.view_src).n_views += 1
            if node.flags & FLAG_INPUT:
                self.allocate(node, buffer)
            for src in node.src:
                if src is None:
                    continue
                self.get(src).n_children += 1
                if src.flags & FLAG_INPUT:
                    self.allocate(src, buffer)
        for node, buffer in nodes:
            for src in node.src:
                if src is not None:
                    self.allocate(src, buffer)
            self.allocate(node, buffer)
            for src in node.src:
                if src is not None:
                    self._release(src)
        sizes: list[int | Affine] = []
        seen: set[int] = set()
        for talloc in self.tallocs:
            sizes.append(0 if id(talloc) in seen else talloc.max_size)
            seen.add(id(talloc))
        return sizes

    def _release(self, parent: Tensor) -> None:
        p_hn = self.get(parent)
        p_hn.n_children -= 1
        if p_hn.n_children != 0 or p_hn.n_views != 0:
            return
        if parent.view_src is not None:
            view_src = parent.view_src
            vs_hn = self.get(view_src)
            vs_hn.n_views -= 1
            if vs_hn.n_views == 0 and vs_hn.n_children == 0 and vs_hn.allocated:
                self.free(view_src)
        elif p_hn.allocated:
            self.free(parent)
