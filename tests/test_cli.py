"""The `uvit` command: fast start, presets, one-line errors."""

import subprocess
import sys

from typer.testing import CliRunner

from uvit_cli.cli import app

runner = CliRunner()


def test_help_does_not_import_torch():
    code = "import sys; from uvit_cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    r = subprocess.run([sys.executable, "-m", "uvit_cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "presets" in r.stdout


def test_presets_list_and_show():
    r = runner.invoke(app, ["presets", "list"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "coco_uvit_s2_deep" in r.output and "imagenet256_uvit_h2" in r.output
    r = runner.invoke(app, ["presets", "show", "coco_uvit_s2_deep", "--set", "train.lr=1e-4"])
    assert r.exit_code == 0
    assert "depth = 16" in r.output and "lr = 0.0001" in r.output


def test_errors_are_one_line_exit_2():
    for args in (["presets", "show", "nope"], ["presets", "show", "coco_uvit_s2", "--set", "model.bogus=1"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.output
        assert "Traceback" not in r.output
