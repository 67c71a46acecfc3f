"""The planning pipeline of `plan`, `serve` and the benchmarks: probe → model → plan.

`PlanInputs` gathers what does not change between plans (the model's profile, the request, the toolchain,
the user's figures) and makes a plan for the devices as probed now, each time it is asked: serve re-plans
after an out-of-memory or a crash. What runs llama-server to measure (calibration on first sight, --verify)
lives in launch/ and is passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llamalaunch.errors import PlanError, ToolchainError
from llamalaunch.model.load import load_profile
from llamalaunch.model.profile import ModelProfile
from llamalaunch.paths import cache_dir
from llamalaunch.plan.argv import ArgvOptions
from llamalaunch.plan.choose import estimate_plan
from llamalaunch.plan.companions import (
    Companion,
    check_companion_files,
    companion_notes,
    draft_companion,
    host_refusal,
    host_room,
    mmproj_companion,
    pin_device,
    with_host_companions,
    with_reservations,
)
from llamalaunch.plan.overheads import (
    calibratable,
    load_calibrations,
    overhead_note,
    parse_overheads,
    planned_overheads,
    sources_for,
)
from llamalaunch.plan.planner import make_plan
from llamalaunch.plan.request import Request
from llamalaunch.plan.search import largest_fitting, require_trained_ctx
from llamalaunch.plan.speed import SpeedEstimate
from llamalaunch.plan.speed_args import SpeedArgs
from llamalaunch.plan.split import CTX_STEP
from llamalaunch.plan.types import Plan
from llamalaunch.probe.device import Device, HostMemory
from llamalaunch.probe.inventory import (
    fill_unknown_memory,
    probe_devices,
    refuse_busy_workers,
    refuse_down_workers,
)
from llamalaunch.toolchain.demo import demo_model_path
from llamalaunch.toolchain.discover import Toolchain, find_toolchain

# Measures the overhead of devices seen for the first time (launch/calibrate.py's calibrate_first_sight):
# (devices, llama-server or None) → one line per device.
FirstSightCalibration = Callable[[Sequence[Device], Path | None], list[str]]


class Lessons(Protocol):
    """What serve learned from failed loads (launch/lessons.py): applied to the request of the next plan."""

    def apply(self, request: Request) -> Request: ...


@dataclass
class PlanInputs:
    """Everything one plan needs; `plan()` re-probes live devices each time it is called."""

    model_path: str
    profile: ModelProfile
    request: Request
    rpc: tuple[str, ...]
    assume: tuple[str, ...]
    overhead: Mapping[str, int]
    toolchain: Toolchain | None
    problems: list[str] = field(default_factory=list)
    devices: tuple[Device, ...] = ()
    mmproj: str | None = None
    draft: str | None = None
    host_free_bytes: int | None = None
    speed_args: SpeedArgs = field(default_factory=lambda: SpeedArgs())
    host: HostMemory | None = None
    calibrate: FirstSightCalibration | None = None  # measures devices seen for the first time before planning
    calibration_tried: set[str] = field(default_factory=set)

    @classmethod
    def gather(cls, *, model: str | None, demo: bool, llama_server: str | None, rpc: Sequence[str],
               assume: Sequence[str], overhead: Sequence[str], request: Request,
               need_toolchain: bool = False, mmproj: str | None = None, draft: str | None = None,
               generic_arch: bool = False, speed_args: SpeedArgs | None = None,
               calibrate: FirstSightCalibration | None = None, config_server: str | None = None,
               on_progress: Callable[[str], None] | None = None) -> PlanInputs:
        """`on_progress` gets a line before the demo model is downloaded (a fresh cache: ~98 MB)."""
        problems: list[str] = []
        try:  # first: a missing llama-server is said before the demo model is downloaded for nothing
            toolchain: Toolchain | None = find_toolchain(llama_server, config_server)
        except ToolchainError as error:
            if need_toolchain or llama_server or config_server:  # a path the user gave is a typo to fix, not a note
                raise
            toolchain = None
            problems.append(f"{error}; the command line assumes a current llama-server")
        model_path = str(demo_model_path(cache_dir(), on_progress=on_progress)) if demo or model is None else model
        profile = load_profile(model_path, allow_unknown_arch=generic_arch)
        check_companion_files(mmproj, draft)  # checked now: companions are sized only once a device is chosen
        overheads = parse_overheads(overhead)
        return cls(model_path, profile, request, tuple(rpc), tuple(assume), overheads, toolchain, problems,
                   mmproj=mmproj, draft=draft, speed_args=speed_args or SpeedArgs(), calibrate=calibrate)

    def probe(self, serving: bool = False) -> tuple[Device, ...]:
        inventory = probe_devices(rpc=self.rpc, assume=self.assume, keep_down=True)
        left_out = set(self.request.exclude)  # --exclude, or a -dev not listing it, plans without a down worker
        if self.request.devices is not None:
            left_out |= {device.name for device in inventory.devices} - set(self.request.devices)
        refuse_down_workers(inventory, left_out)
        if serving:
            refuse_busy_workers(inventory)
        inventory = fill_unknown_memory(inventory, self.request.budget_bytes)
        self.problems.extend(p for p in inventory.problems if p not in self.problems)
        self.devices = inventory.devices
        self.host_free_bytes = inventory.host.free_bytes
        self.host = inventory.host
        return inventory.devices

    def plan(self, lessons: Lessons | None = None, serving: bool = False) -> Plan:
        """The plan for the devices as probed now; `serving` refuses busy workers (refuse_busy_workers)."""
        request = lessons.apply(self.request) if lessons is not None else self.request
        devices = self.probe(serving)
        notes = self.calibrate_new(devices)
        if self.draft and request.ctx_tokens is None:
            plan = self.largest_with_draft(request, devices)
        else:
            plan = self.plan_at(request, devices)
        sources = sources_for(devices, load_calibrations(), self.overhead)
        if note := overhead_note(sources):
            notes.append(note)
        if self.profile.generic_estimate:
            notes.append(f"{self.profile.arch} is not a known architecture: a generic, conservative estimate")
        described = tuple((name, source.describe()) for name, source in sources.items())
        return dataclasses.replace(plan, notes=(*plan.notes, *notes), overhead_sources=described)

    def calibrate_new(self, devices: Sequence[Device]) -> list[str]:
        """Calibrate devices seen for the first time (DESIGN.md §3: the overhead differs per GPU and
        driver), each tried at most once per run; what-if devices never. One line per calibration."""
        if self.calibrate is None:
            return []
        fresh = [d for d in devices if calibratable(d) and d.name not in self.calibration_tried]
        self.calibration_tried.update(d.name for d in fresh)
        return self.calibrate(fresh, self.toolchain.server.path if self.toolchain is not None else None)

    def plan_at(self, request: Request, devices: Sequence[Device]) -> Plan:
        """One plan, the companions reserved for this request's context on the device they are pinned to, or in host
        memory when the plan has no device (a CPU-only machine, every device excluded)."""
        capabilities = self.toolchain.server.capabilities if self.toolchain is not None else None
        pinned = pin_device(devices, request)  # None: no device, the companions stay in host memory
        companions = self.companions(request, pinned)
        on_host = companions if pinned is None else []
        if companions and pinned is not None:
            request = with_reservations(request, pinned, companions)
        options = ArgvOptions(self.model_path, capabilities,
                              tuple((c, pinned.name) for c in companions) if pinned is not None else ())
        try:
            plan = make_plan(self.profile, devices, request, options, planned_overheads(devices, self.overhead),
                             host_free_bytes=host_room(self.host_free_bytes, on_host),
                             speed=self.speed_args.figures(devices, self.host), compare=self.speed_args.compare)
        except PlanError as error:
            if not on_host:
                raise
            raise host_refusal(error, on_host) from None
        return dataclasses.replace(plan, argv=with_host_companions(plan.argv, on_host),
                                   notes=(*plan.notes, *companion_notes(companions, pinned)))

    def largest_with_draft(self, request: Request, devices: Sequence[Device]) -> Plan:
        """--ctx max with a draft model: the draft shares the context, so its reservation grows with it.
        The planner's context search over whole plans, each at one context with the draft sized for it."""
        require_trained_ctx(self.profile)
        fixed = dataclasses.replace(request, ctx_is_target=False)  # a plan that shrinks would hide the misfit

        def plan_or_none(ctx_tokens: int) -> Plan | None:
            try:
                return self.plan_at(dataclasses.replace(fixed, ctx_tokens=ctx_tokens), devices)
            except PlanError:
                return None

        low = max(request.ctx_min_tokens, CTX_STEP)
        found = largest_fitting(low, max(low, self.profile.n_ctx_train), plan_or_none)
        if found is None:  # raises what would fit
            return self.plan_at(dataclasses.replace(fixed, ctx_tokens=low), devices)
        return found[1]

    def companions(self, request: Request, pinned: Device | None) -> list[Companion]:
        """--mmproj and --draft sized for `request`, on the `pinned` device or (None) in host memory."""
        found = [mmproj_companion(self.mmproj)] if self.mmproj else []
        if self.draft:
            ctx = request.ctx_tokens or self.profile.n_ctx_train or 4096
            # llama-server gives the draft the same -c, with its own cache types (-ctkd/-ctvd, f16)
            draft_request = dataclasses.replace(request, cache_type_k="f16", cache_type_v="f16")
            found.append(draft_companion(self.draft, draft_request, ctx, pinned.backend if pinned else None))
        return found

    def overheads(self, devices: Sequence[Device]) -> dict[str, int]:
        """What calibration measured for these GPUs, then the user's --overhead on top."""
        return planned_overheads(devices, self.overhead)

    def speed_at(self, plan: Plan, fill_tokens: int,
                 prompt_tokens: int | None = None) -> SpeedEstimate | None:
        """The plan's speed estimate for the requests served: at their context fill, their prompts in
        batches of their size when smaller than an ubatch; the figures planned with."""
        figures = self.speed_args.figures(self.devices, self.host) if plan.speed is not None else None
        if figures is None:
            return None
        if prompt_tokens:
            ubatch = max(1, min(plan.request.n_ubatch, prompt_tokens))
            plan = dataclasses.replace(plan, request=dataclasses.replace(plan.request, n_ubatch=ubatch))
        return estimate_plan(plan, dataclasses.replace(figures, fill_tokens=fill_tokens))

    def server_name(self) -> str:
        return str(self.toolchain.server.path) if self.toolchain is not None else "llama-server"

    def model_label(self) -> str:
        """'SmolLM2 135M Instruct (/models/smollm2.gguf)': the model's own name and the file served."""
        name = self.profile.name.strip()
        return f"{name} ({self.model_path})" if name and name != self.model_path else self.model_path
