"""`pip install .` (a wheel, not editable) outside the checkout (issue 16): the installed
stylelora has its web UI (`ui` is a package), its example datasets (stylelora/datasets/, what
`python -m stylelora.demo` trains on) and generates on the embedded base -- imported from the
install, not from this checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "stylelora", "ui", "datasets")  # what the build reads

PROBE = """
import json, stylelora, ui.app
from stylelora.demo import example_dataset
print(json.dumps({"stylelora": stylelora.__file__, "ui": ui.app.__file__, "serve": callable(ui.app.serve),
                  "dots": str(example_dataset("dots"))}))
"""


def _run(args, cwd, env, timeout=600):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


# ~15 s on 2 busy cores: a wheel build, an install, four fresh interpreters
def test_installed_wheel_has_ui_datasets_and_generates(tmp_path):
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                        if (ROOT / name).is_dir() else {}))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    _run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", "."], src, env)
    (wheel,) = (tmp_path / "dist").glob("stylelora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for py in [*ROOT.glob("stylelora/**/*.py"), *ROOT.glob("ui/**/*.py")]:
        assert py.relative_to(ROOT).as_posix() in names, f"{py} is not in the wheel"
    for ds in (ROOT / "datasets").iterdir():
        for f in ds.iterdir():
            assert f"stylelora/datasets/{ds.name}/{f.name}" in names, f"{f} is not in the wheel"
    site = tmp_path / "site"
    _run(["-m", "pip", "install", "--no-deps", "--no-compile", "--target", site, wheel], tmp_path, env)

    cwd = tmp_path / "elsewhere"  # no checkout here: nothing is importable from the cwd
    cwd.mkdir()
    env["PYTHONPATH"] = str(site)  # before the venv's site-packages (and its editable checkout)
    probe = json.loads(_run(["-c", PROBE], cwd, env).strip().splitlines()[-1])
    for key in ("stylelora", "ui", "dots"):
        assert Path(probe[key]).resolve().is_relative_to(site.resolve()), (key, probe[key])
    assert probe["serve"] and len(list(Path(probe["dots"]).glob("*.png"))) == 32
    assert "--adapters" in _run(["-m", "stylelora.cli", "ui", "--help"], cwd, env)
    assert "--out" in _run(["-m", "stylelora.cli", "train", "--help"], cwd, env)
    out = _run(["-m", "stylelora.cli", "generate", "a red star on a white background", "--steps", 2,
                "-o", "star.png"], cwd, env)
    assert "wrote star.png" in out
    with Image.open(cwd / "star.png") as im:
        assert im.size == (64, 64)
