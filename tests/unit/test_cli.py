"""The CLI parses what it documents: every generation flag reaches the request."""

from __future__ import annotations

from pathlib import Path

from pytest import MonkeyPatch

from ditserve.client.cli import build_parser


def test_generate_and_demo_accept_every_generation_flag() -> None:
    flags = [
        "--negative-prompt", "", "--width", "64", "--height", "64", "--steps", "3", "--guidance-scale", "2",
        "--true-cfg-scale", "3", "--seed", "1", "--num-images", "2", "--format", "raw", "--timeout", "5",
        "--profile-steps", "1",
    ]  # fmt: skip
    for argv in (["generate", "a prompt", *flags], ["demo", *flags]):
        args = build_parser(argv).parse_args(argv)
        assert (args.steps, args.seed, args.num_images, args.profile_steps) == (3, 1, 2, 1)
        assert args.format == "raw" and args.true_cfg_scale == 3.0


def test_a_shipped_model_is_picked_by_name_and_a_folder_by_path(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """`--model shapes-wan` serves the shipped video model from any directory (a wheel's copy included);
    a folder of that name here, or any path, is taken as it is; the image model stays the default."""
    from ditserve.client import config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DITSERVE_MODEL", raising=False)
    shipped = config.shipped_model_dir("shapes-wan")
    assert shipped in config.shipped_model_dirs("shapes-wan") and shipped.name == "shapes-wan"
    benches = (["bench", name, "--out", "x.json"] for name in ("cache", "fidelity", "transport", "serving", "soak"))
    calibrations = (["calibrate", "teacache"], ["calibrate", "step-mask"])
    for command in (["up"], ["demo"], ["serve", "denoiser"], ["serve", "vae"], *benches, *calibrations):
        argv = [*command, "--model", "shapes-wan"]
        assert build_parser(argv).parse_args(argv).model == shipped
    assert build_parser(["up"]).parse_args(["up"]).model == config.shipped_model_dir("shapes-flux")
    (tmp_path / "shapes-wan").mkdir()
    assert build_parser(["up"]).parse_args(["up", "--model", "shapes-wan"]).model == Path("shapes-wan")
    assert config.model_path("elsewhere/shapes-wan") == Path("elsewhere/shapes-wan")
    monkeypatch.setenv("DITSERVE_VIDEO_MODEL", str(tmp_path / "mine"))
    assert config.default_video_model_dir() == tmp_path / "mine"
    assert "--model shapes-flux" in config.missing_model_hint(tmp_path)


def test_serve_spins_openmp_only_in_the_denoiser_unless_the_environment_chose() -> None:
    from ditserve.client.config import services_openmp

    assert services_openmp({}, "denoiser") == {"GOMP_SPINCOUNT": "30000"}
    assert services_openmp({}, "encoder") == services_openmp({}, "vae") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert services_openmp({"OMP_WAIT_POLICY": "ACTIVE"}, "vae") == {}
    assert services_openmp({"GOMP_SPINCOUNT": "0"}, "denoiser") == {}
