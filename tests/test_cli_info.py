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
