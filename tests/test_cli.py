"""The mdsens command line. One test starts the command in subprocesses;
the others call ``mdsens.cli.main`` in this process (none of them
compiles anything)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from mdsens import cli, study

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = shutil.which("mdsens", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.multiprocess
def test_help_prints_usage():
    """``mdsens --help`` and ``mdsens study --help`` (the installed console
    script, else ``python -m mdsens.cli``) print their usage and succeed. They
    import JAX, as ``import mdsens`` does: the lead chose explicit eager
    re-exports in ``mdsens/__init__.py`` over a JAX-free ``--help`` (issue 10)."""
    command = [SCRIPT] if SCRIPT else [sys.executable, "-m", "mdsens.cli"]
    run = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage: mdsens" in run.stdout and "study" in run.stdout and "demo" in run.stdout
    run = subprocess.run([*command, "study", "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "usage: mdsens study" in run.stdout and "--out DIR" in run.stdout


def main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_subcommand_help(capsys):
    code, out, _ = main(capsys, "study", "--help")
    assert code == 0
    for option in ("--out", "--dry-run", "--cache-dir", "--cpu-devices", "--distributed", "--coordinator"):
        assert option in out
    code, out, _ = main(capsys, "demo", "--help")
    assert code == 0
    for option in ("--n", "--phi", "--seed", "--out"):
        assert option in out
    code, out, _ = main(capsys)
    assert code == 0 and "COMMAND" in out


def test_study_requires_out(capsys):
    code, _, err = main(capsys, "study", "config.toml")
    assert code == 2 and "--out" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("[system]\nbuilder = 'soft_sphere_packing'\nn = 8\n[grid]\nphi = []\n", "grid.phi: is an empty list"),
        ("[system]\nbuilder = 'soft_sphere_packing'\nn = 8\ncolour = 'red'\n", "system.colour: unknown key"),
        (
            "[system]\nbuilder = 'soft_sphere_packing'\nn = 8\n[relax]\nmax_steps = 1.5\n",
            "relax.max_steps: expected an integer",
        ),
    ],
)
def test_bad_config_exits_2_naming_the_key(capsys, tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    code, _, err = main(capsys, "study", str(config), "--out", str(tmp_path / "out"))
    assert code == 2
    assert f"mdsens study: error: {config}: {message}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = main(capsys, "study", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "out"))
    assert code == 2 and "nope.toml: cannot read the configuration" in err


def test_unwritable_output_folder_names_the_path(capsys, tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text("[system]\nbuilder = 'soft_sphere_packing'\nn = 8\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = main(capsys, "study", str(config), "--out", str(blocker / "out"), "--no-cache", "--no-progress")
    assert code == 2, err
    assert f"mdsens study: error: output folder {blocker / 'out'}: cannot write there" in err


def test_example_config_is_valid():
    config = study.load_config(ROOT / "data" / "study_example.toml")
    assert len(config.point_args()) >= 32
    assert set(config.sensitivities) == {"small_diameter", "large_diameter", "compression"}
