"""Every input the fuzzer (benchmarks/fuzz_inputs.py) ever found to crash a reader, replayed: each
now ends in a typed error or a result. The files were found against earlier code; see BENCHMARKS.md."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fuzz_targets import FUNCTIONS, make_context

CORPUS = Path(__file__).parent / "data" / "fuzz"
CASES = sorted((folder.name, path) for folder in CORPUS.iterdir() if folder.is_dir() for path in folder.iterdir())


@pytest.fixture(scope="module")
def context(tiny_export):
    return make_context(tiny_export[1])


@pytest.mark.parametrize("target, path", CASES, ids=[f"{t}/{p.name[:14]}" for t, p in CASES])
def test_a_fuzzer_finding_ends_in_a_typed_error_or_a_result(context, target, path):
    started = time.perf_counter()
    FUNCTIONS[target](path.read_bytes(), context)  # raises only if an untyped exception escapes
    if path.name.startswith(("slow-unit", "timeout")):  # found as a hang: it must now be refused at once
        assert time.perf_counter() - started < 2.0


def test_every_reader_is_fuzzed_and_the_corpus_is_not_empty():
    assert set(FUNCTIONS) == {"image", "metadata", "sidecar", "linescan", "detector"}
    assert {t for t, _ in CASES} >= {"image", "metadata", "sidecar", "detector"}
