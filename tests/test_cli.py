"""The `uvit` command: fast start, presets, one-line errors."""

import dataclasses
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from uvit_cli import data
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


def _one_error_line(r, code=2):
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


def test_fid_module_needs_no_click_install():
    # typer >= 0.2x vendors click and no longer installs it: a run-time `import click` broke every command.
    import ast
    from pathlib import Path

    import uvit_cli.cli

    for f in Path(uvit_cli.cli.__file__).parent.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in tree.body:  # module-level imports only (TYPE_CHECKING blocks are fine)
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "click" or n.startswith("click.") for n in names), f"{f.name} imports click"


def test_train_mistakes_fail_before_torch_loads():
    # A wrong preset or --set key must fail in a second, not after importing torch (~5-15 s).
    code = (
        "import sys; from typer.testing import CliRunner; from uvit_cli.cli import app\n"
        "for args in (['train', 'shapes_uvit_tin'], ['train', 'shapes_uvit_tiny', '--set', 'trian.lr=1']):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    assert r.exit_code == 2 and r.output.startswith('error:'), r.output\n"
        "assert 'torch' not in sys.modules, 'torch imported before the preset was checked'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sample_without_model_or_with_missing_ckpt_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here to pick from
    line = _one_error_line(runner.invoke(app, ["sample", "--prompt", "x"]))
    assert "--ckpt" in line and "quickstart/run" in line
    missing = tmp_path / "nope" / "run"
    line = _one_error_line(runner.invoke(app, ["sample", "--ckpt", str(missing), "--prompt", "x"]))
    assert str(missing) in line and "no such file" in line


def test_error_text_in_brackets_is_not_eaten_as_markup():
    import typer

    from uvit_cli.cli.common import fail, handle_errors
    from uvit_cli.errors import ConfigError

    tiny = typer.Typer()

    @tiny.command()
    @handle_errors
    def boom() -> None:
        raise ConfigError("train.betas: expected [beta1, beta2], got [default]")

    r = runner.invoke(tiny, [])
    line = _one_error_line(r)
    assert "[beta1, beta2]" in line and "[default]" in line
    assert fail("x").exit_code == 1


def test_help_shows_the_defaults_written_in_brackets():
    r = runner.invoke(app, ["quickstart", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "default: 10000" in r.output and "else 1 for the tiny model" in r.output


@pytest.mark.parametrize("how", ["signal", "keyboard_interrupt"])
def test_train_interrupt_says_what_was_kept(tmp_path, monkeypatch, how):
    """A stop (Ctrl-C or SIGTERM: the loop saves and returns a result naming the signal) and a hard
    interrupt (a second Ctrl-C) both end `uvit train` with status 130 and the line of what was kept."""
    import uvit_cli.train

    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        if how == "signal":
            return uvit_cli.train.TrainResult(run, 30, None, None, stopped="SIGTERM")
        raise KeyboardInterrupt

    monkeypatch.setattr(uvit_cli.train, "train", interrupted)
    (tmp_path / "feats" / "manifest.json").parent.mkdir()
    (tmp_path / "feats" / "manifest.json").write_text("{}")  # past the CLI's prepared-data check
    args = ["train", "shapes_uvit_tiny", "--run-dir", str(run), "--set", f"data.path={tmp_path / 'feats'}"]
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "interrupted" in r.output and "no checkpoint was saved yet" in r.output
    (run / "ckpts" / "00000030").mkdir(parents=True)
    r = runner.invoke(app, args)
    assert r.exit_code == 130, r.output
    assert "resume from step 30" in r.output and "Traceback" not in r.output


def test_train_without_prepared_data_names_the_prepare_command(tmp_path):
    missing = tmp_path / "never_prepared"
    r = CliRunner().invoke(
        app, ["train", "shapes_uvit_tiny", "--set", f"data.path={missing}"], terminal_width=400
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "uvit prepare shapes" in lines[0], r.output
    command = lines[0].split("`")[1].split()  # the advice, run as printed (fewer images): makes the set
    assert CliRunner().invoke(app, [*command[1:], "--n", "40"]).exit_code == 0
    assert data.read_manifest(missing)["kind"] == "shapes"
    r = CliRunner().invoke(
        app, ["train", "imagenet256_uvit_h2", "--set", f"data.path={tmp_path / 'in256'}"], terminal_width=400
    )
    assert "uvit prepare imagenet --resolution 256 --out" in r.output


def _workflow_call(command, workflow):
    """The call `prepare.<workflow>(...)` in the body of a command function (under `handle_errors`)."""
    import ast
    import inspect
    import textwrap

    fn = inspect.unwrap(command.callback)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == workflow
    ]
    assert len(calls) == 1, (fn.__name__, workflow, len(calls))
    return calls[0]


def test_prepare_commands_pass_keywords_their_workflow_takes_with_its_defaults():
    """`uvit prepare SOURCE` calls `uvit_cli.prepare.<workflow>` by name with every option under its own
    name: a renamed keyword, an option not passed on, or a CLI default that drifts from the core's fails here,
    not on a user's first run."""
    import ast
    import inspect

    import typer.main

    import uvit_cli.prepare
    from uvit_cli.cli import prepare as cli_prepare

    group = typer.main.get_group(cli_prepare.app)
    workflows = {"coco": "prepare_coco", "imagenet": "prepare_imagenet", "cifar10": "prepare_cifar10",
                 "celeba": "prepare_celeba", "folder": "prepare_folder",
                 "official-features": "import_official_features"}  # fmt: skip
    for name, workflow in workflows.items():
        core = inspect.signature(getattr(uvit_cli.prepare, workflow)).parameters
        params = [p for p in group.commands[name].params if p.name != "help"]
        assert {p.name for p in params} <= set(core), (name, {p.name for p in params} - set(core))
        for p in params:
            default = core[p.name].default
            if default is not inspect.Parameter.empty:
                assert str(p.default) == str(default), (name, p.name, p.default, default)
        call = _workflow_call(group.commands[name], workflow)
        positional = [core_name for core_name, c in core.items() if c.default is inspect.Parameter.empty]
        passed = dict(zip(positional, call.args, strict=True))
        passed |= {k.arg: k.value for k in call.keywords}
        for p in params:  # each option reaches the keyword of its name, unchanged
            value = passed.get(p.name)
            assert isinstance(value, ast.Name) and value.id == p.name, (name, p.name)
        assert set(passed) == {p.name for p in params} | {"progress"}, (name, set(passed))
    assert {p.name for p in group.commands["imagenet"].params} >= {"batch_size", "dtype", "precision"}


# The speed levers have no flags: `--set sample.stream_dtype=autocast` etc. sets them in the preset.
LEVERS_FROM_THE_PRESET = {
    "stream_dtype": None,
    "attention": None,
    "compile_mode": None,
    "vae_channels_last": None,
}


def test_sample_options_reach_the_sampler_spec(tmp_path, monkeypatch):
    """`uvit sample` hands each sampling option to the core's SamplerSpec (the settings by their names)."""
    import uvit_cli.sample

    seen = {}

    def capture(out_dir, spec, **kw):
        seen["spec"] = spec
        raise KeyboardInterrupt  # stops before anything loads

    monkeypatch.setattr(uvit_cli.sample, "sample_to_dir", capture)
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    args = ["sample", "--ckpt", str(ckpt), "--preset", "p.toml", "--seed", "7", "--steps", "3", "--cfg-scale",
            "1.5", "--solver", "ddim", "--guidance-interval", "0.1", "0.9", "--batch-size", "2", "--precision",
            "fp32", "--no-compile", "--model-weights", "model", "--vae", "v", "--set", "sample.steps=9",
            "--decode-batch-size", "5", "--cuda-graphs", "--out", str(tmp_path / "s")]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 130
    spec = seen["spec"]
    assert (spec.ckpt, spec.preset, spec.seed, spec.ema, spec.vae) == (str(ckpt), "p.toml", 7, False, "v")
    assert list(spec.overrides) == ["sample.steps=9"]
    assert dataclasses.asdict(spec.settings) == {
        "solver": "ddim", "steps": 3, "cfg_scale": 1.5, "guidance_interval": (0.1, 0.9), "batch_size": 2,
        "decode_batch_size": 5, "precision": "fp32", "compile": False, "cuda_graphs": True,
        **LEVERS_FROM_THE_PRESET,
    }  # fmt: skip
    assert runner.invoke(app, ["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s")]).exit_code == 130
    assert seen["spec"].ema and seen["spec"].seed == 0 and seen["spec"].overrides == []
    assert dataclasses.asdict(seen["spec"].settings) == {
        "solver": None, "steps": None, "cfg_scale": None, "guidance_interval": None, "batch_size": None,
        "decode_batch_size": 50, "precision": None, "compile": None, "cuda_graphs": False,
        **LEVERS_FROM_THE_PRESET,
    }  # fmt: skip


def test_every_option_of_every_command_has_its_declared_flags_and_help():
    """Options declared once as `Annotated` aliases and used by several commands keep their flags, short
    forms and help: a lost `Annotated` shows up here as an option without help."""
    import typer.main

    def commands(group, path=()):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
                yield from commands(cmd, (*path, name))
            else:
                yield (*path, name), cmd

    seen = {}
    for path, cmd in commands(typer.main.get_group(app)):
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, (path, p.name)
            seen[(*path, p.name)] = p.opts
    assert seen[("prepare", "coco", "out")] == ["--out", "-o"]
    assert seen[("prepare", "imagenet", "num_workers")] == ["--workers"]
    assert seen[("prepare", "official-features", "num_workers")] == ["--workers"]
    assert seen[("sample", "set_")] == ["--set"] and seen[("sample", "cfg_scale")] == ["--cfg-scale"]
    assert seen[("sample", "class_")] == ["--class", "-c"]
    assert seen[("fid", "compare", "json_path")] == ["--json"]
    assert seen[("fid", "ref", "mode")] == ["--mode"]


def test_fid_arguments_name_or_imply_their_subcommand():
    """`uvit fid SAMPLES REF` means compare, `uvit fid --ckpt ... REF` (or --preset, --n) generate; a named
    subcommand or --help is the group's own; after `--` nothing is an option."""
    from uvit_cli.cli.fid import route

    own = {"compare", "ref", "pack", "generate", "--help"}
    table = {
        ("a", "b"): "compare",
        ("a", "b", "--batch-size", "7", "--json", "n.json"): "compare",
        ("--ckpt", "c", "ref.npz"): "generate",
        ("ref.npz", "--preset=p.toml"): "generate",
        ("ref.npz", "--n", "5"): "generate",
        ("ref.npz", "-n5"): "generate",
        ("ref.npz", "-n=5"): "generate",
        ("a", "--", "--ckpt"): "compare",  # a file named --ckpt
        ("-nx", "b"): "compare",
    }
    for args, command in table.items():
        assert route(list(args), own) == [command, *args], args
    for args in ([], ["--help"], ["ref", "imgs", "--n", "3"], ["generate", "r"], ["pack", "f", "--out", "o"]):
        assert route(args, own) == args, args


def _stop_at(monkeypatch, target, seen):
    """Replace `target` by a function that records its call and stops the command (exit 130)."""

    def capture(*args, **kwargs):
        seen[target] = (args, kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(target, capture)


def test_fid_options_reach_their_workflow_by_name(tmp_path, monkeypatch):
    """Each `uvit fid` command hands its options to its workflow under their own names; --batch-size is the
    Inception's batch in compare and ref, the sampling batch in generate (the route --ckpt takes)."""
    samples, ref, weights = tmp_path / "samples", tmp_path / "ref.npz", tmp_path / "w.pt"
    samples.mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(samples / "0.png")
    seen = {}
    _stop_at(monkeypatch, "uvit_cli.fid.compute_fid", seen)
    _stop_at(monkeypatch, "uvit_cli.fid.make_ref_stats", seen)
    _stop_at(monkeypatch, "uvit_cli.cli.fid.sampler_spec", seen)
    features = ["--metrics", "fid,is", "--inception-weights", str(weights), "--batch-size", "7", "--workers",
                "3", "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, ["fid", str(samples), str(ref), *features])
    assert r.exit_code == 130, r.output
    args, kw = seen["uvit_cli.fid.compute_fid"]
    assert args == (samples, ref) and kw["metrics"] == ("fid", "is") and kw["clip_score"] is None
    want = {"mode": "legacy_tensorflow", "inception_weights": weights, "batch_size": 7, "workers": 3}
    assert {k: kw[k] for k in want} == want and kw["device"] == "cpu"

    r = runner.invoke(app, ["fid", "ref", str(samples), "--out", str(tmp_path / "new.npz"), *features])
    assert r.exit_code == 130, r.output
    args, kw = seen["uvit_cli.fid.make_ref_stats"]
    assert args == (samples, tmp_path / "new.npz") and {k: kw[k] for k in want} == want

    r = runner.invoke(app, ["fid", "--preset", "p.toml", str(ref), "--batch-size", "7", "--steps", "3",
                            "--cfg-scale", "1.5", "--no-compile", "--set", "sample.steps=9"])  # fmt: skip
    assert r.exit_code == 130, r.output
    _, kw = seen["uvit_cli.cli.fid.sampler_spec"]
    assert kw == {
        "ckpt": None, "preset": "p.toml", "seed": 0, "steps": 3, "cfg_scale": 1.5, "solver": None,
        "guidance_interval": None, "batch_size": 7, "precision": None, "no_compile": True,
        "model_weights": "ema", "vae": None, "set_": ["sample.steps=9"],
    }  # fmt: skip
