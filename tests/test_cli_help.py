"""`stylelora --help` and `stylelora train --help` read only the torch-free config module: no torch,
numpy or judge is imported, and the help prints in well under a second."""

import subprocess
import sys

import pytest

HELP = """
import sys, time
t = time.perf_counter()
from stylelora.cli import main
try:
    main([*sys.argv[1:], "--help"])
except SystemExit:
    pass
heavy = [m for m in ("torch", "numpy", "PIL", "diffusers", "stylelora.world.judge") if m in sys.modules]
print("HEAVY", heavy, "SECONDS", time.perf_counter() - t)
"""


@pytest.mark.parametrize("argv", [[], ["train"], ["generate"]])
def test_help_imports_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", HELP, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: stylelora")
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["HEAVY", "[]"], last
    assert float(last[-1]) < 1.0, last
