"""Property-based fuzzing of a real server on loopback (the scripted engine: the APIs, limits and
scheduler are real). The inputs and checks are bench/fuzz_server.py's; this runs a bounded number
per endpoint so that it fits in the suite, the script runs it longer."""

import importlib.util
import time
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fuzz_server", Path(__file__).resolve().parents[1] / "bench" / "fuzz_server.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)

EXAMPLES = 300  # per endpoint (3 endpoints): well under a minute


@pytest.fixture(scope="module")
def harness():
    srv, _ = fuzz.fuzz_server()
    h = fuzz.Harness(srv)
    yield h
    h.close()
    srv.stop()


def test_every_generated_input_gets_a_well_formed_answer_and_nothing_breaks(harness):
    t0 = time.perf_counter()
    fuzz.run(harness, EXAMPLES)
    assert harness.inputs >= 3 * EXAMPLES * 0.9  # hypothesis ran (nearly) all of them
    print(f"{harness.inputs} fuzz inputs in {time.perf_counter() - t0:.1f} s")
