"""Security: no code path can unpickle (loading a pickle runs arbitrary code), safetensors headers
are size-limited before anything parses them, and the web UI listens on this machine only unless
told otherwise. Static checks read the source with `ast`, so messages that merely mention
torch.load (like the loader's advice on converting a .ckpt) are not mistaken for calls."""

from __future__ import annotations

import ast
import inspect
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("stylelora", "ui", "bench")

# Callables that unpickle: module path -> function names. Matched on the dotted call name with any
# alias resolved from the file's imports (`import pickle as p; p.loads(...)`, `from torch import load`).
UNPICKLERS = {
    "torch": {"load"}, "torch.serialization": {"load"}, "torch.jit": {"load"}, "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"}, "cPickle": {"load", "loads"}, "dill": {"load", "loads"},
    "joblib": {"load"}, "pandas": {"read_pickle"}, "shelve": {"open"}, "marshal": {"load", "loads"},
}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from the file's import statements."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def pickle_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for every call in `source` that can load a pickle."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func) or ""
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        module, _, func = full.rpartition(".")
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        why = None
        if func in UNPICKLERS.get(module, ()):
            why = f"{full}(...)"
        elif _is_false(kw.get("weights_only")):
            why = f"{name}(..., weights_only=False)"
        elif _is_true(kw.get("allow_pickle")) or (module in ("numpy", "np") and func == "load"
                                                   and "allow_pickle" in kw and not _is_false(kw["allow_pickle"])):
            why = f"{name}(..., allow_pickle=True)"
        elif func in ("from_pretrained", "from_single_file", "load_lora_weights") and (
                _is_false(kw.get("use_safetensors")) or _is_false(kw.get("safe_serialization"))):
            why = f"{name}(..., use_safetensors=False)"
        if why:
            hits.append(f"{filename}:{node.lineno}: {why}")
    return hits


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py")) if "__pycache__" not in p.parts]
    assert any(p.name == "adapters.py" for p in files) and any(p.parent.name == "ui" for p in files)
    return files


def test_no_code_path_loads_a_pickle():
    hits = [h for p in _sources() for h in pickle_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert hits == [], "pickle loading found (use safetensors):\n" + "\n".join(hits)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('x.ckpt')",
    "import torch as T\nT.load(f, map_location='cpu')",
    "from torch import load\nload('x.pt')",
    "import torch\nstate = torch.load('x', weights_only=True)",  # still a pickle reader: use safetensors
    "import pickle\npickle.loads(blob)",
    "import pickle as pk\npk.load(open('a', 'rb'))",
    "from pickle import Unpickler\nUnpickler(f).load()",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    "from diffusers import UNet2DModel\nUNet2DModel.from_pretrained('d', use_safetensors=False)",
    "import anything\nanything.read(path, weights_only=False)",
    "import pandas as pd\npd.read_pickle('x')",
])
def test_the_scanner_finds_pickle_loading(snippet):
    assert len(pickle_calls(snippet)) == 1, snippet


@pytest.mark.parametrize("snippet", [
    "msg = 'convert it: torch.load(..., weights_only=True) then save_file'",  # a string, not a call
    "import numpy as np\nnp.load('a.npy')",
    "from safetensors.torch import load_file\nload_file('a.safetensors')",
    "import json\njson.load(f)",
    "from diffusers import UNet2DModel\nUNet2DModel.from_pretrained('d', use_safetensors=True)",
])
def test_the_scanner_ignores_safe_code(snippet):
    assert pickle_calls(snippet) == []


def test_safetensors_header_limit_is_enforced_before_parsing(tmp_path):
    from stylelora.adapters import load_adapter

    assert inspect.signature(load_adapter).parameters["max_header_bytes"].default == 100_000_000
    ok = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
    save_file(ok, tmp_path / "ok.safetensors", metadata={"note": "x" * 5000})
    header = struct.unpack("<Q", (tmp_path / "ok.safetensors").read_bytes()[:8])[0]
    assert load_adapter(tmp_path / "ok.safetensors", max_header_bytes=header).layers  # the limit is inclusive
    with pytest.raises(ValueError, match=rf"declares a {header}-byte header, over max_header_bytes={header - 1}: "
                                         "the file is corrupt, or pass a larger max_header_bytes if you trust it"):
        load_adapter(tmp_path / "ok.safetensors", max_header_bytes=header - 1)
    # A file claiming a 1 TB header is refused from its first 8 bytes: nothing is allocated or parsed.
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**40) + b'{"a":')
    with pytest.raises(ValueError, match=r"declares a 1099511627776-byte header, over max_header_bytes=100000000"):
        load_adapter(tmp_path / "huge.safetensors")


def test_ui_listens_on_localhost_by_default():
    """Without launching anything: the defaults of the CLI flag, serve() and launch_options()."""
    from stylelora.cli import build_parser

    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    tree = ast.parse((ROOT / "ui" / "app.py").read_text())
    defaults = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("serve", "launch_options"):
            args = node.args
            pos = args.args[len(args.args) - len(args.defaults):]
            for a, d in [*zip(pos, args.defaults), *zip(args.kwonlyargs, args.kw_defaults)]:
                if a.arg == "host":
                    defaults[node.name] = ast.literal_eval(d)
    assert defaults == {"serve": "127.0.0.1", "launch_options": "127.0.0.1"}
    # and nothing in the app binds all interfaces on its own
    assert "0.0.0.0" not in (ROOT / "ui" / "app.py").read_text()


def test_base_folder_with_pickle_weights_is_refused(tmp_path, tiny_random_pipe):
    from stylelora.base import load_base

    tiny_random_pipe.save_pretrained(tmp_path / "binbase", safe_serialization=False)
    assert list((tmp_path / "binbase" / "unet").glob("*.bin"))
    with pytest.raises(ValueError, match=r"binbase holds pickle \(\.bin\) weights, which can run code"):
        load_base(tmp_path / "binbase")
