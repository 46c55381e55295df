"""`dyrate testbed ...`: help texts, bad input -> exit code 2, data command end to end."""

import json

import pytest

from dyrate import cli


@pytest.fixture
def main(monkeypatch):
    # Only the testbed command, so these tests do not depend on the other commands' modules.
    monkeypatch.setattr(cli, "COMMANDS", {"testbed": cli.COMMANDS["testbed"]})
    return cli.main


@pytest.mark.parametrize("argv", [["testbed", "--help"], ["testbed", "data", "--help"], ["testbed", "train", "--help"], ["testbed", "eval", "--help"]])
def test_help(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


@pytest.mark.parametrize(
    "argv",
    [
        ["testbed", "data", "--n", "0", "--out", "{tmp}/d"],
        ["testbed", "data", "--seed", "5000", "--out", "{tmp}/d"],
        ["testbed", "data", "--out", "{tmp}/file"],
        ["testbed", "train", "--config", "huge", "--steps", "1", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "-3", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "1", "--threads", "0", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "3", "--stop-after", "0", "--out", "{tmp}/t"],
        ["testbed", "eval", "--model", "{tmp}/nothing"],
        ["testbed", "train", "--config", "tiny", "--steps", "1", "--attn-sup-weight", "1", "--attn-sup-layers", "x", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "1", "--attn-sup-weight", "1", "--attn-sup-layers", "5", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "1", "--query-aux-weight", "-1", "--out", "{tmp}/t"],
        ["testbed", "train", "--config", "tiny", "--steps", "1", "--attn-sup-count", "--out", "{tmp}/t"],
    ],
)
def test_bad_input_exit_code_2(main, argv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dyrate testbed") and ": error:" in err and err.count("\n") == 1


def test_usage_error_exit_code_2(main):
    assert main(["testbed", "data"]) == 2  # --out missing


def test_data_command(main, tmp_path, capsys):
    assert main(["testbed", "data", "--seed", "2", "--n", "3", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["captions"] == 15
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_train_in_slices(main, tmp_path, capsys):
    argv = ["testbed", "train", "--config", "tiny", "--steps", "3", "--batch-size", "2", "--quiet", "--out", str(tmp_path)]
    assert main(argv + ["--stop-after", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    assert (tmp_path / "config.json").exists()  # exported after the slice
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
