"""asv.hostmem: a CPU run's freed tensors are reused from the heap instead of being faulted in afresh, and
asv.extract's CPU evaluation reads audio without forking workers."""

import json
import platform
import subprocess
import sys

import torch

from asv.extract import eval_workers
from asv.hostmem import retain_freed_memory_on

# In a fresh interpreter: this process's allocator is left as it is, and the counts start from a clean heap.
PROBE = """
import json, resource, torch
from asv.hostmem import retain_freed_memory

def faults_per_block(n_bytes, times=3):
    # A 64 MiB block is above glibc's largest automatic mmap threshold (32 MiB): by default each one is a fresh
    # mapping whose pages the first write faults in.
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        x = torch.empty(n_bytes // 4)
        x.fill_(1.0)
        del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / times

block = 64 << 20
before = faults_per_block(block)
applied = retain_freed_memory()
faults_per_block(block, times=12)  # the heap grows to hold the block (glibc settles after a few rounds)
after = faults_per_block(block)
print(json.dumps({"before": before, "after": after, "applied": applied}))
"""


def test_freed_blocks_come_back_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    if platform.libc_ver()[0] != "glibc":  # elsewhere nothing is changed, and retain_freed_memory says so
        assert r["applied"] is False
        return
    assert r["applied"] is True
    # Without the setting every block faults its pages in again (16,384 of 4 KiB; fewer where transparent huge
    # pages are always on); with it the same heap memory is handed out again.
    assert r["before"] > 0
    assert r["after"] <= r["before"] / 10, r


def test_only_cpu_runs_are_tuned():
    assert retain_freed_memory_on("cuda") is False
    assert retain_freed_memory_on(torch.device("cuda", 0)) is False


def test_evaluation_reads_audio_in_process_on_cpu_only():
    assert eval_workers(None, torch.device("cpu")) == 0
    assert eval_workers(None, torch.device("cuda", 0)) == 2
    assert eval_workers(3, torch.device("cpu")) == 3  # an explicit --num_workers is kept
    assert eval_workers(0, "cuda") == 0
