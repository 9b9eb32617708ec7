"""bench serving's in-process measure of what coalescing decodes would save and change, on the shipped
model: the same latents alone and in one batch."""

from __future__ import annotations

from pathlib import Path

from ditserve.services.tools.bench.decode_batching import measure_decode_batching


def test_a_batch_of_decodes_is_timed_against_decodes_alone_and_compared(model_dir: Path) -> None:
    measured = measure_decode_batching(model_dir, "a red circle on a blue background", batch=3, repeats=1)
    assert measured["batch"] == 3 and measured["values_per_output"] == 64 * 64 * 3
    assert measured["solo_ms_per_output"] > 0 and measured["batched_ms_per_output"] > 0
    assert 0 <= measured["outputs_identical"] <= 3
    # what a batched decode moves is rounding: at most one uint8 level, in few values
    assert measured["max_difference"] <= 1
    assert measured["values_differing"] <= 0.01 * 3 * measured["values_per_output"]
