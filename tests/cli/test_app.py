"""The command line as a user meets it: version, info, scan, synth, and the one error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nvfcli.app import app
from stages import __version__
from tests.helpers import make_multipie_tree, write_tiny_png

runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env=env)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"nvf {__version__}"


def test_every_command_loads_and_its_listed_help_is_its_docstring():
    from nvfcli.app import COMMANDS, LazyCommand, load_command

    for name in COMMANDS:
        command = load_command(name)
        assert command.name == name and command.callback is not None
        assert LazyCommand(name).help == (command.help or "").splitlines()[0]  # what `nvf --help` lists


@pytest.mark.parametrize("args", [["--help"], ["poses", "--help"], ["scan", "--help"]])
def test_help_and_light_commands_do_not_import_torch(args):
    code = ("import sys; from typer.testing import CliRunner; from nvfcli.app import app; "
            f"result = CliRunner().invoke(app, {args!r}); "
            "print(result.exit_code, 'Usage' in result.stdout, 'torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["0", "True", "False"], done.stderr  # torch alone takes ~2 s to import


def test_info_json_reports_versions_devices_and_offline_hub():
    result = invoke("info", "--json", env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["libraries"]["torch"] and report["libraries"]["safetensors"]
    assert report["devices"][0]["name"].startswith("cpu") and report["devices"][0]["free_gib"] > 0
    assert report["hub"] == {"endpoint": report["hub"]["endpoint"], "offline": True, "reachable": False}
    assert "nvf cache" in report["caches"]


def test_scan_summary_list_and_json(tmp_path):
    make_multipie_tree(tmp_path / "data", subjects=(1, 2), shots=(0, 7))
    listed = invoke("scan", str(tmp_path / "data"), "--list")
    assert listed.exit_code == 0
    assert listed.stdout.split() == ["001_01_01_00", "001_01_01_07", "002_01_01_00", "002_01_01_07"]
    as_json = invoke("scan", str(tmp_path / "data"), "--json", "--subject", "2", "--protocol", "p")
    summary = json.loads(as_json.stdout)["summary"]
    assert summary["subjects"] == 1 and summary["images"] == 2 * 13
    written = invoke("scan", str(tmp_path / "data"), "--out", str(tmp_path / "index.json"))
    assert written.exit_code == 0 and str(tmp_path / "index.json") in written.stdout
    doc = json.loads((tmp_path / "index.json").read_text())
    assert doc["summary"]["captures"] == 4 and len(doc["captures"][0]["images"]) == 15


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "{tmp}/missing"], "no such folder"),
        (["scan", "{tmp}/misnamed", "--layout", "multipie"], "do not follow the Multi-PIE naming"),
        (["scan", "{tmp}/misnamed", "--protocol", "Z"], "unknown protocol 'Z'"),
        (["scan", "{tmp}/misnamed", "--subject", "one"], "bad subject 'one'"),
        (["synth", "{tmp}/s", "--preset", "huge"], "unknown preset 'huge'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    write_tiny_png(tmp_path / "misnamed" / "face.png")
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_unknown_layout_is_a_usage_error(tmp_path):
    result = invoke("scan", str(tmp_path), "--layout", "sideways")
    assert result.exit_code == 2 and "sideways" in result.stderr


def test_nvf_debug_shows_the_traceback(tmp_path):
    result = invoke("scan", str(tmp_path / "missing"), env={"NVF_DEBUG": "1"})
    assert result.exit_code != 0 and type(result.exception).__name__ == "InputError"


def test_console_script_error_line_and_exit_code(tmp_path):
    """The installed entry point, run as a user would, keeps stdout clean and says one line on stderr."""
    nvf = os.path.join(os.path.dirname(sys.executable), "nvf")
    if not os.path.exists(nvf):
        pytest.skip("nvf console script not installed in this environment (pip install -e .)")
    done = subprocess.run([nvf, "scan", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no such folder" in done.stderr


def test_synth_then_scan_reports_two_subjects_with_15_cameras(tmp_path):
    out = tmp_path / "s"
    made = invoke("synth", str(out), "--subjects", "2", "--resolution", "32")
    assert made.exit_code == 0, made.output
    assert (out / "session01/multiview/002/01/05_1/002_01_01_051_00.png").is_file()
    assert (out / "groundtruth/001_01_01_00/poses.safetensors").is_file()
    scanned = json.loads(invoke("scan", str(out), "--json").stdout)["summary"]
    assert scanned["subjects"] == 2 and scanned["cameras_per_capture"] == {"15": 2}
    assert set(scanned["per_camera"].values()) == {2} and len(scanned["per_camera"]) == 15
    again = invoke("synth", str(out), "--subjects", "2", "--resolution", "32")
    assert again.exit_code == 0  # second run skips finished captures


def test_synth_bad_config_is_one_line(tmp_path):
    result = invoke("synth", str(tmp_path / "s"), "--textureless", "999")
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "999" in result.stderr
    assert not (tmp_path / "s").exists()
