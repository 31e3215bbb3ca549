"""The saescope command line: help for every sub-command, info on SAEs and models, clear errors."""

import pytest

from engine.cli import build_parser, main
from engine.model.tiny import save_tiny_model
from tests.engine.saes_util import random_sae


@pytest.mark.parametrize("command", ["info", "train-sae", "precompute", "serve", "demo", "bench"])
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_info_on_sae(tmp_path, capsys):
    random_sae("topk", hook="blocks.3.hook_resid_post").save(tmp_path / "sae")
    assert main(["info", str(tmp_path / "sae")]) == 0
    out = capsys.readouterr().out
    for line in ("architecture: topk", "d_in: 64", "d_sae: 256", "hook: blocks.3.hook_resid_post", "dtype: float32", "k: 8"):
        assert line in out


def test_info_on_model(tmp_path, capsys):
    path = save_tiny_model(tmp_path / "m", "gpt_neox")
    assert main(["info", "--model", str(path), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "family: gpt_neox" in out and "blocks.1.attn.hook_z  [64]" in out and "blocks.0.hook_resid_pre" in out


def test_info_errors_are_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "saescope info: error:" in err and "does not exist" in err and "Traceback" not in err


def test_train_refuses_k_not_below_width(tmp_path, capsys):
    code = main(["train-sae", "--model", "x", "--hook", "blocks.0.hook_resid_post", "--corpus", str(tmp_path),
                 "--width", "16", "--k", "16", "--tokens", "100", "--out", str(tmp_path / "o")])
    assert code == 2 and "--k must satisfy" in capsys.readouterr().err
