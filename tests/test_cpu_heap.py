"""engine.cpu_heap: a CPU engine's freed tensors stay in the process's heap for the next step (no fresh pages to fault
in and zero), and a sleeping engine hands them back. Each case runs in its own interpreter: the setting is
process-wide and one-way."""

import json
import subprocess
import sys

import pytest

from engine import cpu_heap

MIB = 1 << 20

PROBE = """
import json, resource, torch
from engine import cpu_heap

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

def cycle():
    '''A 64 MiB tensor written and freed: the page faults it took, and what of it stays resident after the free.'''
    faults, before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, resident()
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, resident() - before

keep = {keep}
if keep:
    assert cpu_heap.keep_freed_memory()
first_faults, kept_bytes = cycle()
again_faults, _ = cycle()
before_release = resident()
released = cpu_heap.release_freed_memory()
print(json.dumps(dict(first_faults=first_faults, kept_bytes=kept_bytes, again_faults=again_faults,
                      released=released, released_bytes=before_release - resident())))
"""


def probe(keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(keep=keep)], capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(cpu_heap._glibc() is None, reason="not glibc's malloc")


def test_glibc_unmaps_a_large_tensor_by_default():
    """The behaviour being changed: each cycle maps fresh pages (a fault a page) and unmaps them on free."""
    default = probe(keep=False)
    assert default["again_faults"] > 8192  # 64 MiB of 4 KiB pages: 16384
    assert default["kept_bytes"] < 8 * MIB


def test_a_kept_heap_reuses_freed_pages_until_released():
    kept = probe(keep=True)
    assert kept["kept_bytes"] > 48 * MIB  # freed, still resident for the next step
    assert kept["again_faults"] < 1024  # the second cycle wrote into the same pages
    assert kept["released"] and kept["released_bytes"] > 48 * MIB  # a sleeping engine's malloc_trim
