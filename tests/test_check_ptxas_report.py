"""The CI's ptxas report check reads spills and serialised wgmma off nvcc's -Xptxas -v output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "check_ptxas_report", Path(__file__).with_name("check_ptxas_report.py")
)
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

CLEAN = """\
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90a'
ptxas info    : Function properties for _Z6kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers
"""


def test_clean_report():
    assert check.problems(CLEAN) == (1, [])


def test_spill_names_the_kernel():
    entries, found = check.problems(
        CLEAN
        + CLEAN.replace("_Z6kernelv", "_Z5otherv").replace(
            "0 bytes spill loads", "8 bytes spill loads"
        )
    )
    assert entries == 2
    assert found == ["_Z5otherv (sm_90a): 0 bytes spill stores, 8 bytes spill loads"]


def test_serialised_wgmma():
    line = (
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to program dependence on compiler-inserted WG.AR in divergent path in "
        "the function '_Z6kernelv'\n"
    )
    assert check.problems(CLEAN + line)[1] == ["_Z6kernelv: wgmma serialised by ptxas (C7520)"]


def test_accepted_spill_passes_up_to_its_bound():
    name = (
        "_ZN3jfm4sm9014prefill_sparse8backward30sparse_prefill_backward_kernelILi576EEEvNS1_4ArgsE"
    )
    report = CLEAN.replace("_Z6kernelv", name)
    assert check.problems(report.replace("0 bytes spill loads", "24 bytes spill loads"))[1] == []
    assert (
        len(check.problems(report.replace("0 bytes spill loads", "32 bytes spill loads"))[1]) == 1
    )
