"""Compute buffers per device and for the host (first cut: a peak-set bound from the shapes).

llama.cpp measures the worst-case graph (n_ubatch tokens over the full KV) with ggml-alloc; each
backend's buffer holds the copies of its split inputs (times 4 with pipeline parallelism) plus the
largest set of tensors alive at once inside one of its layers, and the output device the logits.
"""

from __future__ import annotations

from llamalaunch.model.kv import F32_BYTES, ContextShape, layer_cells
from llamalaunch.model.profile import ModelProfile
from llamalaunch.plan.request import Request

PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES


def compute_buffers(profile: ModelProfile, placement: object, request: Request,
                    shape: ContextShape) -> tuple[dict[str, int], int]:
    """(compute bytes per device name, host compute bytes)."""
    ranges = placement.ranges  # type: ignore[attr-defined]
    offloaded = sum(r.n_slots for r in ranges)
    pipeline = len([r for r in ranges if r.n_slots > 0]) > 1 and offloaded == profile.n_slots
    copies = PIPELINE_COPIES if pipeline else 1
    n_t = shape.n_ubatch
    act = profile.n_embd * n_t * F32_BYTES
    mask = _mask_bytes(profile, request, shape)
    layer_peak = _layer_peak(profile, shape, mask)
    output = profile.n_vocab * shape.n_seq * F32_BYTES + act
    devices: dict[str, int] = {}
    for r in ranges:
        if r.n_slots == 0:
            devices[r.device] = 0
            continue
        has_output = r.first_slot + r.n_slots == profile.n_slots
        has_block = r.first_slot < profile.n_layer
        size = copies * (mask + act) + (layer_peak if has_block else 0) + (output if has_output else 0)
        devices[r.device] = size
    host = copies * (mask + act) + act  # graph inputs (times the pipeline copies) and token embeddings
    first = profile.n_slots - offloaded
    if first > 0:
        host += layer_peak
    if first == profile.n_slots:
        host += output
    return devices, host


def _mask_bytes(profile: ModelProfile, request: Request, shape: ContextShape) -> int:
    per = 2 if shape.flash_attn else F32_BYTES
    cells = {layer_cells(profile, request, shape, il) * shape.n_stream for il in range(profile.n_layer)}
    return sum(c * shape.n_ubatch for c in cells) * per // shape.n_stream * shape.n_stream


def _layer_peak(profile: ModelProfile, shape: ContextShape, mask: int) -> int:
    n_t = shape.n_ubatch
    act = profile.n_embd * n_t * F32_BYTES
    ffn = 3 * act + 3 * profile.n_ff * n_t * F32_BYTES
    attn = 4 * act
    if not shape.flash_attn:
        n_head = max(profile.n_head) if profile.n_head else 1
        attn += shape.n_ctx_seq * shape.n_stream * n_t * n_head * F32_BYTES
    return max(ffn, attn)
