"""A shape-only model of ggml: tensors, the ops llama.cpp's graphs use, and graph building.

No data is ever touched. Each op creates a tensor with the type, shape, strides and sources ggml's
own constructor gives it (ggml/src/ggml.c), so that a graph built here with the same calls as
llama.cpp's model builders has the same nodes, in the same order, as the real one. sched.py then
splits it across backends and allocates it the way ggml-backend.cpp and ggml-alloc.c do.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import count

from llamalaunch.model.ggml.types import type_block

FLAG_INPUT = 1
FLAG_OUTPUT = 2
# ops ggml-alloc may run in place over a source (ggml_op_can_inplace)
INPLACE_OPS = frozenset({"FILL", "SCALE", "DIAG_MASK_ZERO", "DIAG_MASK_INF", "ADD", "ADD_ID", "ADD1", "SUB",
                         "MUL", "DIV", "SQR", "SQRT", "LOG", "UNARY", "ROPE", "ROPE_BACK", "SILU_BACK",
                         "RMS_NORM", "RMS_NORM_BACK", "CLAMP", "SOFT_MAX", "SOFT_MAX_BACK"})
VIEW_OPS = frozenset({"VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})  # ggml_is_view_op
_ids = count()
_captures: list[list[Tensor]] = []


@contextmanager
def capture() -> Iterator[list[Tensor]]:
    """Collect every tensor created inside the block, in creation order."""
    created: list[Tensor] = []
    _captures.append(created)
    try:
        yield created
    finally:
        _captures.pop()


class Tensor:
    """A ggml tensor without data. `buffer` is the backend index of a pre-allocated tensor (weights, KV)."""

    __slots__ = ("buffer", "flags", "id", "name", "nb", "ne", "op", "src", "type", "view_offs", "view_src",
                 "weights")
    id: int
    op: str
    type: str
    ne: tuple[int, ...]
    nb: tuple[int, ...]
    src: tuple[Tensor | None, ...]
    view_src: Tensor | None
    view_offs: int
    flags: int
    name: str
    buffer: int | None  # the backend index of a pre-allocated tensor
    weights: bool  # a WEIGHTS-usage buffer (the scheduler follows weights)

    def __init__(self, type_name: str, ne: Sequence[int], op: str = "NONE", src: Sequence[Tensor | None] = (),
                 view_src: Tensor | None = None, view_offs: int = 0, nb: Sequence[int] | None = None) -> None:
        self.id = next(_ids)
        self.op = op
        self.type = type_name
        self.ne = tuple(ne) + (1,) * (4 - len(ne))
        if view_src is not None and view_src.view_src is not None:
            view_offs += view_src.view_offs
            view_src = view_src.view_src
        self.view_src = view_src
        self.view_offs = view_offs
        self.nb = tuple(nb) if nb is not None else contiguous_strides(type_name, self.ne)
        self.src = tuple(src)
        self.flags = 0
        self.name = ""
        self.buffer = None
        self.weights = False
        if _captures:
            _captures[-1].append(self)

    def __repr__(self) -> str:
        return f"<{self.name or self.op} {self.type}{list(self.ne)}>"

    def nbytes(self) -> int:
        block, size = type_block(self.type)
        if any(n <= 0 for n in self.ne):
            return 0
        if block == 1:
            return size + sum((n - 1) * s for n, s in zip(self.ne, self.nb))
        return self.ne[0] * self.nb[0] // block + sum((n - 1) * s for n, s in zip(self.ne[1:], self.nb[1:]))

    def nelements(self) -> int:
        return self.ne[0] * self.ne[1] * self.ne[2] * self.ne[3]

    @property
    def is_view(self) -> bool:
        return self.view_src is not None

    def named(self, name: str) -> Tensor:
        self.name = name
        return self


def contiguous_strides(type_name: str, ne: Sequence[int]) -> tuple[int, ...]:
    block, size = type_block(type_name)
    nb = [size, size * (ne[0] // block)]
    for i in (2, 3):
        nb.append(nb[i - 1] * ne[i - 1])
    return tuple(nb)


# --- tensor constructors ---------------------------------------------------------------------------


def new(type_name: str, *ne: int, name: str = "") -> Tensor:
    return Tensor(type_name, ne).named(name)


def new_input(type_name: str, *ne: int, name: str = "") -> Tensor:
    tensor = new(type_name, *ne, name=name)
    tensor.flags |= FLAG_INPUT
    return tensor


def weight(type_name: str, *ne: int, backend: int, name: str = "") -> Tensor:
    tensor = new(type_name, *ne, name=name)
    tensor.buffer = backend
    tensor.weights = True
    return tensor


def cache(type_name: str, *ne: int, backend: int, name: str = "") -> Tensor:
    tensor = new(type_name, *ne, name=name)
    tensor.buffer = backend
    return tensor


# --- ops (ggml.c) ----------------------------------------------------------------------------------


def _dup(a: Tensor, op: str, *src: Tensor | None) -> Tensor:
    return Tensor(a.type, a.ne, op, src)


def view_tensor(a: Tensor, op: str = "NONE", src: Sequence[Tensor | None] = ()) -> Tensor:
    return Tensor(a.type, a.ne, op, src, view_src=a, nb=a.nb)


def mul_mat(a: Tensor, b: Tensor) -> Tensor:
    return Tensor("f32", (a.ne[1], b.ne[1], b.ne[2], b.ne[3]), "MUL_MAT", (a, b))


def mul_mat_id(as_: Tensor, b: Tensor, ids: Tensor) -> Tensor:
    return Tensor("f32", (as_.ne[1], ids.ne[0], b.ne[2], 1), "MUL_MAT_ID", (as_, b, ids))


def add(a: Tensor, b: Tensor) -> Tensor:
    return _dup(a, "ADD", a, b)


def sub(a: Tensor, b: Tensor) -> Tensor:
    return _dup(a, "SUB", a, b)


def mul(a: Tensor, b: Tensor) -> Tensor:
    return _dup(a, "MUL", a, b)


def div(a: Tensor, b: Tensor) -> Tensor:
    return _dup(a, "DIV", a, b)


def scale(a: Tensor) -> Tensor:
    return _dup(a, "SCALE", a)


def clamp(a: Tensor) -> Tensor:
    return _dup(a, "CLAMP", a)


def unary(a: Tensor) -> Tensor:
    """silu, gelu, tanh, relu, sigmoid, exp, neg, softplus ... (GGML_OP_UNARY)."""
    return _dup(a, "UNARY", a)


def sqr(a: Tensor) -> Tensor:
    return _dup(a, "SQR", a)


def sqrt(a: Tensor) -> Tensor:
    return _dup(a, "SQRT", a)


def rms_norm(a: Tensor) -> Tensor:
    return _dup(a, "RMS_NORM", a)


def norm(a: Tensor) -> Tensor:
    return _dup(a, "NORM", a)


def l2_norm(a: Tensor) -> Tensor:
    return _dup(a, "L2_NORM", a)


def rope(a: Tensor, pos: Tensor, factors: Tensor | None = None) -> Tensor:
    return _dup(a, "ROPE", a, pos, factors)


def get_rows(a: Tensor, b: Tensor) -> Tensor:
    out_type = "i32" if a.type == "i32" else "f32"
    return Tensor(out_type, (a.ne[0], b.ne[0], b.ne[1], b.ne[2]), "GET_ROWS", (a, b))


def set_rows(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return view_tensor(a, "SET_ROWS", (b, c, a))


def cpy(a: Tensor, b: Tensor) -> Tensor:
    return view_tensor(b, "CPY", (a, b))


def cast(a: Tensor, type_name: str) -> Tensor:
    result = Tensor(type_name, a.ne, "CPY")
    result.src = (a, result)
    return result


def cont(a: Tensor, *ne: int) -> Tensor:
    return Tensor(a.type, ne or a.ne, "CONT", (a,))


def glu(a: Tensor, b: Tensor | None = None) -> Tensor:
    """swiglu/geglu/reglu: split form (a, b) keeps a's shape; the fused form halves ne0."""
    ne = a.ne if b is not None else (a.ne[0] // 2, *a.ne[1:])
    return Tensor(a.type, ne, "GLU", (a, b))


def soft_max(a: Tensor, mask: Tensor | None = None) -> Tensor:
    return _dup(a, "SOFT_MAX", a, mask)


def flash_attn_ext(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sinks: Tensor | None = None) -> Tensor:
    ne = (v.ne[0], q.ne[2], q.ne[1], q.ne[3])
    return Tensor("f32", ne, "FLASH_ATTN_EXT", (q, k, v, mask, sinks))


def concat(a: Tensor, b: Tensor, dim: int) -> Tensor:
    ne = list(a.ne)
    ne[dim] += b.ne[dim]
    return Tensor(a.type, ne, "CONCAT", (a, b))


def pad(a: Tensor, p0: int, p1: int = 0, p2: int = 0, p3: int = 0) -> Tensor:
    return Tensor(a.type, (a.ne[0] + p0, a.ne[1] + p1, a.ne[2] + p2, a.ne[3] + p3), "PAD", (a,))


def sum_rows(a: Tensor) -> Tensor:
    return Tensor(a.type, (1, *a.ne[1:]), "SUM_ROWS", (a,))


def argsort_top_k(a: Tensor, k: int) -> Tensor:
    """ggml_argsort_top_k: an i32 argsort, then a view of its first k columns."""
    order = Tensor("i32", a.ne, "ARGSORT", (a,))
    return view_4d(order, k, order.ne[1], order.ne[2], order.ne[3], order.nb[1], order.nb[2], order.nb[3], 0)


def top_k(a: Tensor, k: int) -> Tensor:
    return Tensor("i32", (k, *a.ne[1:]), "TOP_K", (a,))


def repeat(a: Tensor, b: Tensor) -> Tensor:
    return Tensor(a.type, b.ne, "REPEAT", (a,))


def ssm_conv(sx: Tensor, c: Tensor) -> Tensor:
    d_conv, d_inner = c.ne[0], sx.ne[1]
    n_t, n_s = sx.ne[0] - d_conv + 1, sx.ne[2]
    return Tensor("f32", (d_inner, n_t, n_s), "SSM_CONV", (sx, c))


def ssm_scan(s: Tensor, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor, ids: Tensor) -> Tensor:
    return Tensor("f32", (x.nelements() + s.nelements(),), "SSM_SCAN", (s, x, dt, a, b, c, ids))


# --- views ---------------------------------------------------------------------------------------


def reshape(a: Tensor, *ne: int) -> Tensor:
    return Tensor(a.type, ne, "RESHAPE", (a,), view_src=a)


def view_1d(a: Tensor, ne0: int, offset: int) -> Tensor:
    return Tensor(a.type, (ne0,), "VIEW", (a,), view_src=a, view_offs=offset)


def view_2d(a: Tensor, ne0: int, ne1: int, nb1: int, offset: int) -> Tensor:
    size = type_block(a.type)[1]
    nb = (size, nb1, nb1 * ne1, nb1 * ne1)
    return Tensor(a.type, (ne0, ne1), "VIEW", (a,), view_src=a, view_offs=offset, nb=nb)


def view_3d(a: Tensor, ne0: int, ne1: int, ne2: int, nb1: int, nb2: int, offset: int) -> Tensor:
    size = type_block(a.type)[1]
    nb = (size, nb1, nb2, nb2 * ne2)
    return Tensor(a.type, (ne0, ne1, ne2), "VIEW", (a,), view_src=a, view_offs=offset, nb=nb)


def view_4d(a: Tensor, ne0: int, ne1: int, ne2: int, ne3: int, nb1: int, nb2: int, nb3: int,
            offset: int) -> Tensor:
    size = type_block(a.type)[1]
    return Tensor(a.type, (ne0, ne1, ne2, ne3), "VIEW", (a,), view_src=a, view_offs=offset,
                  nb=(size, nb1, nb2, nb3))


def permute(a: Tensor, ax0: int, ax1: int, ax2: int, ax3: int) -> Tensor:
    ne, nb = [0] * 4, [0] * 4
    for src_axis, dst_axis in enumerate((ax0, ax1, ax2, ax3)):
        ne[dst_axis], nb[dst_axis] = a.ne[src_axis], a.nb[src_axis]
    return Tensor(a.type, ne, "PERMUTE", (a,), view_src=a, nb=nb)


def transpose(a: Tensor) -> Tensor:
    ne = (a.ne[1], a.ne[0], a.ne[2], a.ne[3])
    nb = (a.nb[1], a.nb[0], a.nb[2], a.nb[3])
    return Tensor(a.type, ne, "TRANSPOSE", (a,), view_src=a, nb=nb)


# --- graph -----------------------------------------------------------------------------------------


class Graph:
    """ggml_cgraph: nodes and leafs in the order ggml_build_forward_expand visits them."""

    def __init__(self) -> None:
        self.nodes: list[Tensor] = []
        self.leafs: list[Tensor] = []
        self._seen: set[int] = set()

    def expand(self, tensor: Tensor) -> None:
        """Depth-first, sources left to right, each tensor once (ggml_visit_parents_graph)."""
        stack: list[tuple[Tensor, int]] = [(tensor, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                if node.id in self._seen:
                    continue
                self._seen.add(node.id)
            src: Tensor | None = None
            while index < len(node.src):
                candidate = node.src[index]
                if candidate is not None and candidate.id not in self._seen:
                    src = candidate
                    break
                index += 1
            if src is None:
                (self.leafs if node.op == "NONE" else self.nodes).append(node)
                continue
            stack.append((node, index + 1))
            stack.append((src, 0))
