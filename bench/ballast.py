"""Hold GPU memory so that only N MiB stay free: a small card on a big one.

Usage: python bench/ballast.py LEAVE_FREE_MIB [--after-pid-pattern TEXT]
Prints 'ballast ready FREE_MIB' and holds until killed. With --grow-when TEXT it first allocates
nothing, waits for a process whose command line contains TEXT, then takes LEAVE_FREE_MIB less
than was free (a card shrinking under a planned load: the OOM ladder's test).
"""

from __future__ import annotations

import sys
import time

import psutil
import torch


def hold(leave_free_mib: int) -> torch.Tensor:
    free, _total = torch.cuda.mem_get_info()
    take = free - leave_free_mib * 1024 * 1024
    return torch.empty(max(take, 0), dtype=torch.uint8, device="cuda")


def wait_for(pattern: str) -> None:
    me = psutil.Process().pid
    while True:
        for process in psutil.process_iter(["cmdline"]):
            if process.pid != me and pattern in " ".join(process.info["cmdline"] or []):
                return
        time.sleep(0.01)


def main() -> None:
    leave = int(sys.argv[1])
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the context first, so it is not counted in what stays free
    if len(sys.argv) > 3 and sys.argv[2] == "--grow-when":
        wait_for(sys.argv[3])
        free, _ = torch.cuda.mem_get_info()
        block = torch.empty(leave * 1024 * 1024, dtype=torch.uint8, device="cuda")
        print(f"ballast grew by {leave} MiB (free was {free // 2**20} MiB)", flush=True)
    else:
        block = hold(leave)
        free, _ = torch.cuda.mem_get_info()
        print(f"ballast ready {free // 2**20}", flush=True)
    while True:
        time.sleep(3600)
        del block


if __name__ == "__main__":
    main()
