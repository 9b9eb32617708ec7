"""bench/reference.py: the environments the in-process sides run in, and its worker on a tiny Wan folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ditserve.services.tools.bench import reference


def test_the_users_environment_has_no_threading_variables() -> None:
    base = {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}
    assert reference.user_environment(base) == {"PATH": "/bin"}


def test_the_services_environment_spins_briefly_unless_the_user_chose() -> None:
    assert reference.services_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GOMP_SPINCOUNT": "30000"}
    assert reference.services_environment({"OMP_WAIT_POLICY": "PASSIVE"}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert reference.services_environment({"GOMP_SPINCOUNT": "0"}) == {"GOMP_SPINCOUNT": "0"}


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ditserve.services.tools.modelgen.tiny_wan import write_tiny_wan

    return write_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


def test_the_worker_runs_the_familys_pipeline_at_the_folders_defaults(tiny_wan: Path) -> None:
    with reference.InProcessWorker(tiny_wan, 2, reference.user_environment()) as worker:
        seconds, frames = worker("a red circle", 1)
        settings = worker.settings
    assert seconds > 0 and frames.dtype == np.uint8 and frames.shape == (1, 9, 64, 64, 3)
    assert settings == {"height": 64, "width": 64, "num_frames": 9, "steps": 2, "video_format": "raw"}
    assert np.array_equal(frames, reference.reference_for(tiny_wan, 2)("a red circle", 1))


def test_the_transport_breakdown_keeps_what_no_stage_accounts_for() -> None:
    from ditserve.services.tools.bench.transport import stage_breakdown

    rows = [
        {"services_s": 0.1, "stage_ms": {"encode": 10.0, "denoise": 50.0}, "queue_ms": 1.0},
        {"services_s": 0.2, "stage_ms": {"encode": 20.0}, "queue_ms": 0.0},
    ]
    assert stage_breakdown(rows) == {"denoise": 25.0, "encode": 15.0, "unaccounted": pytest.approx(109.5)}
