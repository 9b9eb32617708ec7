"""`auto` by measurement, the pure half (attention/choice.py): no kernel runs here, only timings as data."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditserve.services.denoiser.attention import choice
from ditserve.services.denoiser.attention.choice import AttentionShape, AutoTune, Trial

SHAPE = AttentionShape(batch=1, tokens=4608, heads=24, head_dim=128, dtype="bf16")
TOLERANCE = choice.TOLERANCE["bf16"]


def test_the_fastest_acceptable_backend_wins_and_the_reason_lists_every_time_fastest_first() -> None:
    trials = [
        Trial("torch_sdpa", 0.80e-3, 0.0),
        Trial("sdpa_cudnn", 0.40e-3, 4e-3),
        Trial("fa", 0.30e-3, 0.5),  # faster, but wrong: rejected
        Trial("sdpa_efficient", failure="RuntimeError: no kernel"),
    ]
    backend, reason = choice.choose(trials, TOLERANCE)
    assert backend == "sdpa_cudnn"
    assert "sdpa_cudnn 0.400 ms" in reason and "torch_sdpa 0.800 ms" in reason
    assert "fa 0.300 ms, rejected: error 5.0e-01 > 0.016" in reason
    assert "sdpa_efficient failed (RuntimeError: no kernel)" in reason
    assert reason.index("fa 0.300") < reason.index("sdpa_cudnn 0.400") < reason.index("torch_sdpa 0.800")


def test_an_error_at_the_tolerance_is_still_acceptable() -> None:
    trials = [Trial("torch_sdpa", 2.0, 0.0), Trial("sdpa_flash", 1.0, TOLERANCE)]
    assert choice.choose(trials, TOLERANCE)[0] == "sdpa_flash"


def test_nothing_acceptable_is_an_error_naming_the_trials() -> None:
    with pytest.raises(ValueError, match=r"no backend ran within 0.016 of torch_sdpa: torch_sdpa failed"):
        choice.choose([Trial("torch_sdpa", failure="out of memory")], TOLERANCE)


def test_the_key_changes_with_each_thing_that_can_change_the_winner() -> None:
    key = choice.cache_key("NVIDIA H200", "2.11.0", ["torch_sdpa", "sdpa_cudnn"], SHAPE)
    assert key == choice.cache_key("NVIDIA H200", "2.11.0", ["sdpa_cudnn", "torch_sdpa"], SHAPE)  # a set
    others = [
        choice.cache_key("NVIDIA H100 80GB HBM3", "2.11.0", ["torch_sdpa", "sdpa_cudnn"], SHAPE),
        choice.cache_key("NVIDIA H200", "2.12.0", ["torch_sdpa", "sdpa_cudnn"], SHAPE),
        choice.cache_key("NVIDIA H200", "2.11.0", ["torch_sdpa", "sdpa_cudnn", "fa"], SHAPE),
        choice.cache_key(
            "NVIDIA H200", "2.11.0", ["torch_sdpa", "sdpa_cudnn"], AttentionShape(1, 14040, 12, 128, "bf16")
        ),
        choice.cache_key(
            "NVIDIA H200", "2.11.0", ["torch_sdpa", "sdpa_cudnn"], AttentionShape(1, 4608, 24, 128, "fp16")
        ),
    ]
    assert len({key, *others}) == 6


def test_cache_path_env_then_xdg_then_home() -> None:
    assert choice.cache_path({choice.CACHE_ENV: "/tmp/a.json", "XDG_CACHE_HOME": "/x"}) == Path("/tmp/a.json")
    assert choice.cache_path({"XDG_CACHE_HOME": "/x"}) == Path("/x/ditserve/attention-auto.json")
    assert choice.cache_path({}) == Path.home() / ".cache" / "ditserve" / "attention-auto.json"


def test_decisions_round_trip_and_keep_each_other(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "attention-auto.json"
    assert choice.read_decision(path, "a") is None  # no file yet
    choice.write_decision(path, "a", "sdpa_cudnn", "fastest: ...")
    choice.write_decision(path, "b", "torch_sdpa", "only one")
    choice.write_decision(path, "a", "fa", "remeasured")
    assert choice.read_decision(path, "a") == ("fa", "remeasured")
    assert choice.read_decision(path, "b") == ("torch_sdpa", "only one")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"a": "sdpa_cudnn"}', '{"a": {"backend": "fa"}}'])
def test_an_unreadable_cache_is_empty_and_rewritable(tmp_path: Path, text: str) -> None:
    path = tmp_path / "attention-auto.json"
    path.write_text(text)
    assert choice.read_decision(path, "a") is None
    choice.write_decision(path, "a", "torch_sdpa", "measured")
    assert choice.read_decision(path, "a") == ("torch_sdpa", "measured")


@pytest.mark.parametrize(
    ("mode", "device", "measures"),
    [("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)],
)
def test_when_auto_measures(mode: str, device: str, measures: bool) -> None:
    assert AutoTune(SHAPE, mode).measures(device) is measures
