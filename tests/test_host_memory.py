"""glibc malloc settings: freed temporaries are reused instead of page-faulted afresh, and a user's choice stands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.host_memory import _USER_CHOICES, allocator_chosen_by_user

REPO = Path(__file__).resolve().parents[1]

# Three 24 MiB temporaries written and freed, 20 times after 5 rounds of warm-up. With glibc's starting thresholds
# (128 KiB mmap, 128 KiB trim) every block is mmapped and unmapped, so each round faults all its pages in again;
# glibc's self-adjustment from there (trim threshold up to 64 MiB) helps only when nothing else lies above the blocks.
TEMPORARIES = """
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from trainer.host_memory import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse()
def round_of_temporaries():
    blocks = [torch.ones(6 * 2**20) for _ in range(3)]  # 24 MiB each, every page written
    del blocks
for _ in range(5):
    round_of_temporaries()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_of_temporaries()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    env = {key: value for key, value in os.environ.items() if key not in (*_USER_CHOICES, "GLIBC_TUNABLES")}
    env["PYTHONPATH"] = str(REPO)
    if mode == "glibc start":
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", TEMPORARIES, mode], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_temporaries_are_reused_instead_of_faulted_in_again():
    pages_per_round = 3 * 24 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert minor_faults("glibc start") > 15 * pages_per_round  # the test has teeth: pages come back every round
    assert minor_faults("tuned") < pages_per_round / 10  # kept and reused


@pytest.mark.parametrize(("environ", "chosen"), [
    ({}, False),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "/opt/lib/libtcmalloc_minimal.so.4"}, True),
    ({"LD_PRELOAD": "/opt/lib/libasan.so"}, False),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1024"}, False),
])
def test_a_users_own_allocator_choice_is_left_alone(environ, chosen):
    assert allocator_chosen_by_user(environ) is chosen
