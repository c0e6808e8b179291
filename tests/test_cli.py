"""The `jaxdiff` command: version, help, train's --config.KEY overrides, a quiet start, the console script."""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig

import ml_collections
import pytest

import jaxdiff
from jaxdiff import cli
from jaxdiff.train import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"jaxdiff {jaxdiff.__version__}\n"
    assert importlib.metadata.version("jaxdiff") == jaxdiff.__version__  # pyproject reads it


def test_generate_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    # one block per option: its line and the wrapped lines of its help under it
    blocks, in_options = [], False
    for line in out.splitlines():
        if line in ("options:", "optional arguments:"):
            in_options = True
        elif in_options and line.startswith("  -"):
            blocks.append(line)
        elif in_options and line.startswith("    ") and blocks:
            blocks[-1] += " " + line.strip()
    options = [a for a in cli.build_parser()[1]["generate"]._actions if a.option_strings]
    assert len(blocks) == len(options) >= 14
    for action in options:
        block = next(b for b in blocks if b.split()[0].rstrip(",") == action.option_strings[0])
        assert all(s in block for s in action.option_strings)
        if action.dest != "help":
            assert "default" in block, block
    assert "(default: the model folder's)" in " ".join(out.split())


def test_verbose_goes_before_or_after_the_command():
    parser = cli.build_parser()[0]
    assert parser.parse_args(["generate", "x"]).verbose is False
    assert parser.parse_args(["--verbose", "generate", "x"]).verbose is True
    assert parser.parse_args(["generate", "x", "--verbose"]).verbose is True
    assert parser.parse_args(["train", "--until_step", "3"]).until_step == 3  # the old spelling stays
    assert parser.parse_args(["train", "--until-step=4"]).until_step == 4


def test_split_overrides():
    rest, overrides = run_config.split_overrides(["train", "--config", "c.py:tiny", "--config.a=1", "--config.b.c", "x y",
                                           "--config.flag", "--workdir", "w", "--config.n", "-1", "--config.e="])
    assert rest == ["train", "--config", "c.py:tiny", "--workdir", "w"]
    assert overrides == [("a", "1"), ("b.c", "x y"), ("flag", None), ("n", "-1"), ("e", "")]


def _config():
    c = ml_collections.ConfigDict()
    c.steps, c.lr, c.flag, c.name, c.parts, c.unset = 10, 1e-3, False, "x", ("a",), None
    c.train = ml_collections.ConfigDict()
    c.train.batch, c.train.sizes = 4, (1, 2)
    return c


@pytest.mark.parametrize("overrides, key, expected", [
    ([("steps", "6")], "steps", 6),
    ([("steps", "0x10")], "steps", 16),
    ([("lr", "2e-4")], "lr", 2e-4),
    ([("lr", "3")], "lr", 3.0),
    ([("flag", "true")], "flag", True),
    ([("flag", "True")], "flag", True),
    ([("flag", "1")], "flag", True),
    ([("flag", None)], "flag", True),  # a bare --config.flag
    ([("flag", "false")], "flag", False),
    ([("name", "123")], "name", "123"),  # a str field takes the text as it is
    ([("name", "/runs/a b")], "name", "/runs/a b"),
    ([("parts", '("vae","text_encoders")')], "parts", ("vae", "text_encoders")),
    ([("parts", "vae")], "parts", ("vae",)),
    ([("parts", "vae"), ("parts", "unet")], "parts", ("vae", "unet")),  # repeated: added up
    ([("train.sizes", "(64,128,256)")], "train.sizes", (64, 128, 256)),
    ([("train.batch", "8")], "train.batch", 8),  # nested key
    ([("unset", "3")], "unset", 3),  # a None field: a literal, else the text
    ([("unset", "dpmpp_2m")], "unset", "dpmpp_2m"),
    ([("steps", "6"), ("steps", "7")], "steps", 7),  # the last one wins
])
def test_override_config(overrides, key, expected):
    config = _config()
    run_config.override_config(config, overrides)
    node = config
    for part in key.split("."):
        node = node[part]
    assert node == expected and type(node) is type(expected)


@pytest.mark.parametrize("overrides, message", [
    ([("stepz", "3")], "no such config field: --config.stepz (config has no 'stepz'; did you mean "
                       "--config.steps?)"),
    ([("train.batchz", "3")], "no such config field: --config.train.batchz"),
    ([("nope.batch", "3")], "no such config field: --config.nope.batch"),
    ([("steps.x", "3")], "no such config field: --config.steps.x (config.steps is 10, not a group"),
    ([("steps", "abc")], "--config.steps=abc: not an int"),
    ([("steps", "1.5")], "--config.steps=1.5: not an int"),
    ([("lr", "fast")], "--config.lr=fast: not a float"),
    ([("flag", "yes")], "--config.flag=yes: not a bool"),
    ([("steps", None)], "--config.steps needs a value"),
    ([("parts", "a b")], "--config.parts=a b: not a tuple"),
    ([("train.batch", "1"), ("train", "{}")], "--config.train comes after --config.train.batch"),
])
def test_override_config_names_a_bad_key_or_value(overrides, message):
    with pytest.raises(ValueError) as e:
        run_config.override_config(_config(), overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_overrides_of_a_real_config():
    """A field the config links to another (the U-Net's channels follow the VAE's) moves with it, as
    with ml_collections' own flags."""
    config = run_config.load_config(os.path.join(ROOT, "configs", "shapes_unet.py:tiny"))
    run_config.override_config(config, [("model.vae.latent_channels", "6"),
                                 ("init.components", '("vae","text_encoders")'),
                                 ("train.train_text_encoder", "False")])
    assert config.model.unet.in_channels == config.model.unet.out_channels == 6
    assert config.init.components == ("vae", "text_encoders")
    assert config.train.train_text_encoder is False


def test_train_reports_a_bad_override_in_one_line(tmp_path, capsys):
    config = os.path.join(ROOT, "configs", "shapes_vae.py:tiny")
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path), "--config.train.steps=abc"]) == 2
    assert capsys.readouterr().err == "error: --config.train.steps=abc: not an int\n"
    assert cli.main(["train", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: train needs --config configs/NAME.py and --workdir DIR\n"
    assert not os.listdir(tmp_path)


def test_config_loads_from_any_directory(tmp_path):
    """configs/ files import `configs.common`: they load from outside the checkout too (the installed
    `jaxdiff` command), with neither absl's config flags nor TensorFlow."""
    script = ("import sys\nfrom jaxdiff.train import run_config\n"
              f"c = run_config.load_config({os.path.join(ROOT, 'configs', 'shapes_vae.py')!r} + ':tiny')\n"
              "run_config.override_config(c, [('train.steps', '7')])\n"
              "print(c.mode, c.train.steps, 'ml_collections.config_flags' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["vae", "7", "False", "False"]


# Run as `python -m jaxdiff.cli`, with torch hidden as on a machine without it (`pip install jaxdiff`),
# where transformers would print "PyTorch was not found..." on import.
_RUN_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; "
                      "runpy.run_module('jaxdiff.cli', run_name='__main__', alter_sys=True)")


def test_generate_prints_only_the_paths(pipeline_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TF_CPP_MIN_LOG_LEVEL")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _RUN_WITHOUT_TORCH, "generate", "a red circle", "--model", pipeline_dir("sd1"),
           "--steps", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"{out / 'image_000.png'}\n"
    assert "Unable to initialize backend" not in run.stderr and "PyTorch was not found" not in run.stderr
    assert run.stderr == ""
    assert os.path.isfile(out / "image_000.png")


def test_console_script_is_installed():
    entry = importlib.metadata.entry_points(group="console_scripts")["jaxdiff"]
    assert entry.value == "jaxdiff.cli:main"
    script = os.path.join(sysconfig.get_path("scripts"), "jaxdiff")
    if not os.path.exists(script):  # a --user install, say: wherever pip put it, on PATH
        import shutil

        script = shutil.which("jaxdiff")
    assert script, "no jaxdiff script: reinstall with `pip install -e .`"
    run = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == f"jaxdiff {jaxdiff.__version__}\n", run.stderr
