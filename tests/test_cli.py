"""The `ldm` command: exit codes and one-line errors."""

import subprocess
import sys

from latent_diffusion.cli import main


def test_demo_then_info(tmp_path, capsys):
    assert main(["demo", "--outdir", str(tmp_path)]) == 0
    assert main(["info", str(tmp_path / "tiny-random.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "variant sd1 (eps-prediction)" in out and "context (1, 77, 32)" in out


def test_bad_checkpoint_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    run = subprocess.run([sys.executable, "-m", "latent_diffusion.cli", "info", str(tmp_path / "bad.safetensors")],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "bad.safetensors: not a readable .safetensors file" in run.stderr


def test_unwritable_outdir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--outdir", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out
