"""ggml's backend scheduler and graph allocator, replayed on ggml_sim graphs to size compute buffers.

`reserve(graph, backends, ...)` follows ggml_backend_sched_split_graph (ggml-backend.cpp: assign a
backend to every node, split the graph where the backend changes, copy split inputs, keep 4 copies of
them with pipeline parallelism) and then ggml_gallocr_reserve_n (ggml-alloc.c: a best-fit dynamic
allocator per buffer type with in-place reuse and freeing at the last use). The result is each
backend's compute buffer size, as llama.cpp's `sched_reserve: X compute buffer size` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamalaunch.model.ggml_sim import FLAG_INPUT, FLAG_OUTPUT, INPLACE_OPS, VIEW_OPS, Graph, Tensor, row_size

MAX_COPIES = 4  # GGML_SCHED_MAX_COPIES
CUDA_ROW_PADDING = 512
CUDA_OFFLOAD_MIN_BATCH = 32
_HUGE = 1 << 62
_QUANT_FREE = frozenset({"f32", "f16", "bf16", "i32", "i64", "i8"})


@dataclass(frozen=True)
class Backend:
    """One ggml backend as the scheduler sees it; the CPU backend is always last."""

    name: str
    kind: str  # "CUDA", "RPC", "CPU"
    buft: str  # its buffer type; the CPU backend uses the first device's host buffer type if it has one
    alignment: int
    remote_kind: str = "CPU"  # RPC: what the worker runs on (its alloc sizes follow that backend)

    def supports_buft(self, buft: str, buft_is_host: bool) -> bool:
        return buft_is_host if self.kind == "CPU" else buft == self.buft

    def alloc_size(self, tensor: Tensor) -> int:
        size = tensor.nbytes()
        kind = self.remote_kind if self.kind == "RPC" else self.kind
        if kind == "CUDA" and tensor.type not in _QUANT_FREE and tensor.ne[0] % CUDA_ROW_PADDING:
            size += row_size(tensor.type, CUDA_ROW_PADDING - tensor.ne[0] % CUDA_ROW_PADDING)
        return size

    def offload_op(self, node: Tensor) -> bool:
        if self.kind != "CUDA":
            return False  # RPC devices do not offload; the CPU is the fallback
        if node.op == "GET_ROWS":
            return False
        batch = node.ne[1] if node.op == "MUL_MAT" else node.ne[2] if node.op in ("MUL_MAT_ID", "ROPE") \
            else node.ne[1] * node.ne[2] * node.ne[3]
        return batch >= CUDA_OFFLOAD_MIN_BATCH


def _is_host_buft(buft: str) -> bool:
    return buft == "CPU" or buft.endswith("_Host")


class _Scheduler:
    def __init__(self, graph: Graph, backends: Sequence[Backend], pipeline: bool, op_offload: bool,
                 assigned: dict[int, int]) -> None:
        self.graph = graph
        self.backends = list(backends)
        self.cpu = len(backends) - 1
        self.n_copies = MAX_COPIES if pipeline else 1
        self.op_offload = op_offload
        self.ids: dict[int, int] = dict(assigned)  # tensor id -> backend index
        self.copies: dict[tuple[int, int], list[Tensor]] = {}

    # -- helpers --
    def bid(self, tensor: Tensor | None) -> int:
        return -1 if tensor is None else self.ids.get(tensor.id, -1)

    def buffer_of(self, tensor: Tensor) -> int | None:
        return tensor.view_src.buffer if tensor.view_src is not None else tensor.buffer

    def buft_of_backend(self, index: int) -> str:
        return self.backends[index].buft

    def from_buffer(self, tensor: Tensor) -> int:
        owner = self.buffer_of(tensor)
        if owner is None:
            return -1
        buft = self.buft_of_backend(owner)
        for index, backend in enumerate(self.backends):
            if backend.supports_buft(buft, _is_host_buft(buft)):
                return index
        return -1

    def buffer_supported(self, tensor: Tensor, backend_index: int) -> bool:
        owner = self.buffer_of(tensor)
        if owner is None:
            owner = self.bid(tensor)
            if owner == -1 and tensor.view_src is not None:
                owner = self.bid(tensor.view_src)
            if owner == -1:
                return False
        buft = self.buft_of_backend(owner)
        return self.backends[backend_index].supports_buft(buft, _is_host_buft(buft))

    # -- pass 1 --
    def from_cur(self, tensor: Tensor) -> int:
        index = self.from_buffer(tensor)
        if index != -1:
            return index
        if tensor.flags & FLAG_INPUT:
            return self.cpu
        if tensor.op in ("ROPE", "FLASH_ATTN_EXT"):
            return -1
        for src in tensor.src:
            if src is None or src.buffer is None or not src.weights:
                continue
            src_backend = self.from_buffer(src)
            if self.op_offload and src_backend == self.cpu:
                for b in range(src_backend):
                    if self.backends[b].offload_op(tensor):
                        return b
            return src_backend
        return -1

    def assign(self) -> None:
        for leaf in self.graph.leafs:
            if self.bid(leaf) == -1:
                self.ids[leaf.id] = self.from_cur(leaf)
        for node in self.graph.nodes:
            if self.bid(node) == -1:
                self.ids[node.id] = self.from_cur(node)
        self.expand(reversed_=False, skip_cpu=True)
        self.expand(reversed_=True, skip_cpu=True)
        self.expand(reversed_=False, skip_cpu=False)
        self.expand(reversed_=True, skip_cpu=False)
        self.pass_3()
        self.pass_4()

    def expand(self, reversed_: bool, skip_cpu: bool) -> None:
        current = -1
        nodes = reversed(self.graph.nodes) if reversed_ else self.graph.nodes
        for node in nodes:
            if node.op in VIEW_OPS:
                continue
            index = self.bid(node)
            if index != -1:
                current = -1 if (skip_cpu and index == self.cpu) else index
            elif current != -1:
                self.ids[node.id] = current

    def pass_3(self) -> None:
        for node in self.graph.nodes:
            if node.op in VIEW_OPS:
                continue
            index = self.bid(node)
            if index == -1:
                best, best_count = -1, -1
                for b in range(len(self.backends)):
                    n = sum(1 for s in node.src if s is not None
                            and (self.bid(s) != -1 or (s.view_src is not None and self.bid(s.view_src) != -1))
                            and self.buffer_supported(s, b))
                    if n > best_count:
                        best, best_count = b, n
                self.ids[node.id] = best
                continue
            for b in range(index):
                if self.backends[b].buft == self.backends[index].buft and all(
                        self.buffer_supported(s, b) for s in node.src if s is not None):
                    self.ids[node.id] = b
                    break

    def pass_4(self) -> None:
        for node in self.graph.nodes:
            if node.view_src is not None and self.bid(node) == -1:
                self.ids[node.id] = self.bid(node.view_src)
            current = self.bid(node)
            for src in node.src:
                if src is not None and self.bid(src) == -1:
                    self.ids[src.id] = self.bid(src.view_src) if src.view_src is not None else current
            if self.bid(node) == -1:
                self.ids[node.id] = 0

    # -- pass 5: splits and copies --
    def split(self) -> list[tuple[int, list[Tensor], list[Tensor]]]:
        """[(backend, inputs, nodes)]; node sources that cross backends are replaced by copies."""
        splits: list[tuple[int, list[Tensor], list[Tensor]]] = []
        current, inputs, nodes = -1, [], []
        first = next((n for n in self.graph.nodes if n.op not in VIEW_OPS), None)
        current = self.bid(first) if first is not None else self.cpu
        for node in self.graph.nodes:
            if node.op in VIEW_OPS:
                nodes.append(node)
                continue
            index = self.bid(node)
            need_new = index == current and inputs and any(
                s is not None and s.buffer is not None and s.weights and self.bid(s) != current
                and not self.buffer_supported(s, current) for s in node.src)
            if index != current or need_new:
                splits.append((current, inputs, nodes))
                current, inputs, nodes = index, [], []
            node.src = tuple(self._input_copy(s, current, inputs) for s in node.src)
            nodes.append(node)
        splits.append((current, inputs, nodes))
        return splits

    def _input_copy(self, src: Tensor | None, backend: int, inputs: list[Tensor]) -> Tensor | None:
        if src is None:
            return None
        if self.bid(src) == backend or self.buffer_supported(src, backend):
            return src
        key = (src.id, backend)
        if key not in self.copies:
            made = []
            for _ in range(self.n_copies):
                copy = Tensor(src.type, src.ne, "NONE", nb=src.nb)
                if self.n_copies > 1:
                    copy.flags |= FLAG_INPUT | FLAG_OUTPUT
                self.ids[copy.id] = backend
                made.append(copy)
            self.copies[key] = made
            inputs.append(src)
        return self.copies[key][0]


def reserve(graph: Graph, backends: Sequence[Backend], pipeline: bool, op_offload: bool = True,
            assigned: dict[int, int] | None = None) -> list[int]:
    """Compute buffer bytes per backend (in `backends` order) for one worst-case graph."""
    sched = _Scheduler(graph, backends, pipeline, op_offload, assigned or {})
    sched.assign()
    splits = sched.split()
    nodes: list[tuple[Tensor, int]] = []
    for backend, inputs, split_nodes in splits:
        for source in inputs:
            dep = Tensor(source.type, source.ne, "NONE", (source,), view_src=source, nb=source.nb)
            nodes.append((dep, sched.bid(source)))
            nodes.append((sched.copies[(source.id, backend)][0], backend))
        nodes.extend((n, sched.bid(n)) for n in split_nodes)
    leafs: list[tuple[Tensor, int]] = []
    if sched.n_copies > 1:
        for leaf in graph.leafs:
            if leaf.flags & FLAG_INPUT:
                leaf.flags |= FLAG_OUTPUT
                index = sched.bid(leaf)
                leafs.append((leaf, index))
                for _ in range(sched.n_copies - 1):
                    twin = Tensor(leaf.type, leaf.ne, "NONE", nb=leaf.nb)
                    twin.flags |= FLAG_INPUT | FLAG_OUTPUT
                    leafs.append((twin, index))
        for backend, inputs, _ in splits:
            for source in inputs:
                leafs.extend((copy, backend) for copy in sched.copies[(source.id, backend)])
    leafs.extend((leaf, sched.bid(leaf)) for leaf in graph.leafs)
    return _Allocator(backends).run(nodes, leafs)


class _DynAlloc:
    """ggml_dyn_tallocr with one chunk: best fit over the free blocks, the last block grows the buffer."""

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        self.blocks: list[list[int]] = [[0, _HUGE]]  # [offset, size], sorted by offset
        self.max_size = 0

    def _aligned(self, size: int) -> int:
        return (size + self.alignment - 1) // self.alignment * self.alignment

    def alloc(self, size: int) -> int:
        size = self._aligned(size)
        best, best_size = -1, _HUGE
        for i in range(len(self.blocks) - 1):
            block_size = self.blocks[i][1]
            if size <= block_size <= best_size:
                best, best_size = i, block_size
        if best == -1:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        offset = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max_size = max(self.max_size, offset + size)
        return offset

    def free(self, offset: int, size: int) -> None:
        size = self._aligned(size)
        blocks = self.blocks
        for i, block in enumerate(blocks):
            if block[0] + block[1] == offset:
                block[1] += size
                if i + 1 < len(blocks) and block[0] + block[1] == blocks[i + 1][0]:
                    block[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if offset + size == block[0]:
                block[0] = offset
                block[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == block[0]:
                    blocks[i - 1][1] += block[1]
                    del blocks[i]
                return
        position = 0
        while position < len(blocks) and blocks[position][0] < offset:
            position += 1
        blocks.insert(position, [offset, size])


class _Node:
    __slots__ = ("n_children", "n_views", "buffer", "offset", "allocated")

    def __init__(self) -> None:
        self.n_children = 0
        self.n_views = 0
        self.buffer = -1
        self.offset = 0
        self.allocated = False


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.type == b.type and a.ne == b.ne and a.nb == b.nb


class _Allocator:
    """ggml_gallocr_alloc_graph_impl: allocation order, in-place reuse, freeing at the last use."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = backends
        self.tallocs: list[_DynAlloc] = []
        by_buft: dict[str, _DynAlloc] = {}
        for backend in backends:
            by_buft.setdefault(backend.buft, _DynAlloc(backend.alignment))
            self.tallocs.append(by_buft[backend.buft])
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
                if parent is None or not self.get(parent).allocated or parent.view_src is not None:
                    continue
                if parent.flags & FLAG_OUTPUT or not _same_layout(tensor, parent):
                    continue
                p_hn = self.get(parent)
                if p_hn.n_children == 1 and p_hn.n_views == 0:
                    hn.buffer, hn.offset = p_hn.buffer, p_hn.offset
                    p_hn.allocated = False
                    self._free_extra(tensor, parent, hn, p_hn)
                    return
        hn.buffer = buffer
        hn.offset = self.tallocs[buffer].alloc(self.backends[buffer].alloc_size(tensor))

    def _free_extra(self, tensor: Tensor, parent: Tensor, hn: _Node, p_hn: _Node) -> None:
        talloc = self.tallocs[p_hn.buffer]
        parent_size = talloc._aligned(self.backends[p_hn.buffer].alloc_size(parent))
        node_size = talloc._aligned(self.backends[hn.buffer].alloc_size(tensor))
        if parent_size > node_size:
            talloc.free(p_hn.offset + node_size, parent_size - node_size)

    def free(self, tensor: Tensor) -> None:
        if tensor.flags & FLAG_OUTPUT:
            return
        hn = self.get(tensor)
        self.tallocs[hn.buffer].free(hn.offset, self.backends[hn.buffer].alloc_size(tensor))
        hn.allocated = False

    def run(self, nodes: Sequence[tuple[Tensor, int]], leafs: Sequence[tuple[Tensor, int]]) -> list[int]:
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
        sizes, seen = [], set()
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
