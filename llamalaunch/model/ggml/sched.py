"""ggml's backend scheduler and graph allocator, replayed on sim.py graphs to size compute buffers.

`reserve(graph, backends, ...)` follows ggml_backend_sched_split_graph (ggml-backend.cpp: assign a
backend to every node, split the graph where the backend changes, copy split inputs, keep 4 copies of
them with pipeline parallelism) and then ggml_gallocr_reserve_n (ggml-alloc.c: a best-fit dynamic
allocator per buffer type with in-place reuse and freeing at the last use). The result is each
backend's compute buffer size, as llama.cpp's `sched_reserve: X compute buffer size` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamalaunch.model.ggml.alloc import Affine, GraphAllocator, Range, same_layout
from llamalaunch.model.ggml.buffers import cuda_alloc_size
from llamalaunch.model.ggml.sim import FLAG_INPUT, FLAG_OUTPUT, VIEW_OPS, Graph, Tensor

MAX_COPIES = 4  # GGML_SCHED_MAX_COPIES
CUDA_OFFLOAD_MIN_BATCH = 32


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
        """ggml_backend_buft_get_alloc_size: nbytes, plus what a CUDA buffer adds."""
        size = tensor.nbytes()
        kind = self.remote_kind if self.kind == "RPC" else self.kind
        if kind != "CUDA":
            return size
        if tensor.op == "FLASH_ATTN_EXT":
            return _cuda_flash_attn_size(tensor, size)
        return cuda_alloc_size(tensor.type, tensor.ne[0], size)

    def offload_op(self, node: Tensor) -> bool:
        if self.kind != "CUDA":
            return False  # RPC devices do not offload; the CPU is the fallback
        if node.op == "GET_ROWS":
            return False
        batch = node.ne[1] if node.op == "MUL_MAT" else node.ne[2] if node.op in ("MUL_MAT_ID", "ROPE") \
            else node.ne[1] * node.ne[2] * node.ne[3]
        return batch >= CUDA_OFFLOAD_MIN_BATCH


def _cuda_flash_attn_size(dst: Tensor, size: int) -> int:
    """ggml_cuda_flash_attn_ext_get_alloc_size: the batched (MMA/tile) kernels the worst-case graph uses
    need F16 copies of a quantized K and V, kept behind the output in the same allocation."""
    k, v = dst.src[1], dst.src[2]
    if k is not None and k.type != "f16":
        size = _pad128(size) + k.nelements() * 2
    v_is_k_view = v is not None and k is not None and v.view_src is not None and (
        v.view_src is k or (v.view_src is k.view_src and v.view_offs == k.view_offs))
    if v is not None and v.type != "f16" and not v_is_k_view:
        size = _pad128(size) + v.nelements() * 2
    return size


def _pad128(size: int) -> int:
    return (size + 127) // 128 * 128


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
        self.copy_source: dict[int, Tensor] = {}  # copy id -> the tensor it copies

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
        inputs: list[Tensor] = []
        nodes: list[Tensor] = []
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
                self.copy_source[copy.id] = src
                made.append(copy)
            self.copies[key] = made
            inputs.append(src)
        return self.copies[key][0]


def reserve(graph: Graph, backends: Sequence[Backend], pipeline: bool, op_offload: bool = True,
            assigned: dict[int, int] | None = None) -> list[int]:
    """Compute buffer bytes per backend (in `backends` order) for one worst-case graph."""
    _, nodes, leafs = _schedule(graph, backends, pipeline, op_offload, assigned or {})
    allocator = GraphAllocator([b.alignment for b in backends], [b.buft for b in backends],
                               lambda tensor, index: backends[index].alloc_size(tensor))
    return [size if isinstance(size, int) else size.c for size in allocator.run(nodes, leafs)]  # ints in, ints out


def reserve_affine(graph: Graph, twin: dict[int, Tensor], n0: int, dn: int, backends: Sequence[Backend],
                   pipeline: bool, op_offload: bool = True, assigned: dict[int, int] | None = None
                   ) -> tuple[list[tuple[int, int]], Range]:
    """Like reserve(), for the graph built at n0 cells whose `twin` (same tensors at n0 + dn) says how
    each size grows: per backend (size at n0, growth per cell), and the cell range where that holds."""
    sched, nodes, leafs = _schedule(graph, backends, pipeline, op_offload, assigned or {})
    valid = Range(n0)

    def partner(tensor: Tensor) -> Tensor:
        source = sched.copy_source.get(tensor.id, tensor)
        return twin[source.id]

    def size(tensor: Tensor, index: int) -> Affine:
        here = backends[index].alloc_size(tensor)
        there = backends[index].alloc_size(partner(tensor))
        if (there - here) % dn:
            raise ValueError("a size does not grow linearly with the context")
        return Affine(here, (there - here) // dn, valid)

    def layout(a: Tensor, b: Tensor) -> bool:
        same = same_layout(a, b)
        if same != same_layout(partner(a), partner(b)):
            valid.keep_sign(0, 1)  # shapes coincide only at this context
        return same

    allocator = GraphAllocator([b.alignment for b in backends], [b.buft for b in backends], size, layout)
    sizes = allocator.run(nodes, leafs)
    return [(s.c, s.s) if isinstance(s, Affine) else (int(s), 0) for s in sizes], valid


def _schedule(graph: Graph, backends: Sequence[Backend], pipeline: bool, op_offload: bool,
              assigned: dict[int, int]) -> tuple[_Scheduler, list[tuple[Tensor, int]], list[tuple[Tensor, int]]]:
    """Split the graph and lay out graph_copy: (nodes with backends, leafs with backends) for ggml-alloc."""
    sched = _Scheduler(graph, backends, pipeline, op_offload, assigned)
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
                    sched.copy_source[twin.id] = leaf
                    leafs.append((twin, index))
        for backend, inputs, _ in splits:
            for source in inputs:
                leafs.extend((copy, backend) for copy in sched.copies[(source.id, backend)])
    leafs.extend((leaf, sched.bid(leaf)) for leaf in graph.leafs)
    return sched, nodes, leafs
