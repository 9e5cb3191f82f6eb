"""``sphereface-plus info``: through the CLI entry point in-process and as ``python -m sphereface_plus``."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from sphereface_plus import list_backbones, list_heads
from sphereface_plus.cli import main

REPO = Path(__file__).resolve().parents[1]


def _check(info):
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["device"]["cuda_available"] == torch.cuda.is_available()
    assert list(info["backbones"]) == list_backbones()
    assert list(info["heads"]) == list_heads()


def test_info_json_in_process(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    _check(info)
    # parameter counts: sphere20 at 112x96 and the A-Softmax head at 512 x 10572
    from sphereface_plus import create_backbone

    expected = sum(p.numel() for p in create_backbone("sphere20").parameters())
    assert info["backbones"]["sphere20"] == expected
    assert info["heads"]["a_softmax"] == 512 * 10572


def test_python_dash_m_info():
    proc = subprocess.run(
        [sys.executable, "-m", "sphereface_plus", "info"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert torch.__version__ in out
    for name in list_backbones() + list_heads():
        assert name in out
    assert "cuda" in out


def test_info_help(capsys):
    try:
        main(["info", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--json" in capsys.readouterr().out


def test_every_command_has_help_and_its_module_parses_nothing_at_import(capsys):
    """Each registered command builds its parser from its module in sphereface_plus/commands."""
    from sphereface_plus.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module.startswith("sphereface_plus.commands."), (name, module)
        try:
            main([name, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, name
        assert "usage: sphereface-plus " + name in capsys.readouterr().out


def test_old_torchrun_entry_point_still_runs_train():
    """``python -m sphereface_plus.apps.train`` (what older scripts give torchrun) is ``python -m sphereface_plus
    train``, with a one-line notice."""
    proc = subprocess.run([sys.executable, "-m", "sphereface_plus.apps.train", "--config", "configs/face/cpu_smoke.yaml",
                           "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backbone: sphere4" in proc.stdout
    notes = [line for line in proc.stderr.splitlines() if "sphereface_plus.apps.train" in line]
    assert len(notes) == 1 and "python -m sphereface_plus train" in notes[0]
