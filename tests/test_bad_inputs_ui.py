"""Issue 14's web-UI items: each bad input gets one clear message (naming the field or file, never a
server path), loses nothing, and the server keeps answering. One app, served with --auth on a free
local port, on the random tiny base; inputs are tiny (caps are crossed by a byte, not by megabytes)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from test_ui import client, launch, make_adapter, request

ADAPTER, DATASET = "zebrafinch", "okapiset"  # names that appear nowhere else in the app
AUTH = ("alice", "s3cret")


def png_bytes(color="red") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(tiny_base, tiny_random_pipe, tmp_path_factory):
    """(app, url, logged-in client)."""
    from ui.app import build_app

    root = tmp_path_factory.mktemp("ui-bad")
    make_adapter(tiny_random_pipe, root / "adapters" / f"{ADAPTER}.safetensors", 1, triggers=["zebra"])
    ds = root / "datasets" / DATASET
    ds.mkdir(parents=True)
    (ds / "a.png").write_bytes(png_bytes())
    (ds / "a.txt").write_text("a red square\n")
    app = build_app(root / "adapters", base=str(tiny_base), datasets_dir=root / "datasets",
                    max_adapter_mb=1, max_dataset_mb=1)
    url = launch(app, auth=":".join(AUTH))
    yield app, url, client(url, auth=AUTH)
    app.close()


def answers(app) -> None:
    """The server still generates (with the adapter, through the API)."""
    result = app[2].predict(*request(steps=2, adapters={ADAPTER: 1.0}, slot_names=[ADAPTER]), api_name="/generate")
    assert Path(result[0]["path"] if isinstance(result[0], dict) else result[0]).is_file()


def listing(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones too) with its bytes: what "nothing was lost" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def zip_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of duplicate names: wanted here
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members:
                z.writestr(name, data)
    return path


def refused(ui, match: str, fn, *args) -> str:
    """fn(*args) raises a user error matching `match`; its message holds no server path."""
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError), match=match) as e:
        fn(*args)
    msg = str(e.value)
    for path in (ui.datasets_dir.parent, "/tmp/", "gradio"):
        assert str(path) not in msg, msg
    return msg


# --- the items --------------------------------------------------------------------------------


def test_names_hidden_from_visitors_not_logged_in(app):
    """Before: the login page embedded the API description, listing every adapter and dataset."""
    url = app[1]
    for path in ("", "config", "gradio_api/info", "gradio_api/openapi.json", "gradio_api/info?all_endpoints=true"):
        try:
            body = urllib.request.urlopen(url + path, timeout=30).read().decode()
        except urllib.error.HTTPError as e:  # 401 for most: its body must not tell either
            body = e.read().decode()
        assert ADAPTER not in body and DATASET not in body, path
    # logged in, the page's load event lists them (and the adapter renders: answers())
    from ui.app import MAX_SLOTS, SLOT_OUTPUTS

    ui = app[0].stylelora
    assert ADAPTER in ui.refresh(*[""] * MAX_SLOTS, None, [])[:MAX_SLOTS * SLOT_OUTPUTS]
    answers(app)


def test_caption_bomb_zip_refused_at_import(app, tmp_path):
    """Before: one PNG and a 100 MB caption of NUL bytes (a 100 kB zip) was imported, its caption
    echoed whole (629 MB reply), and Start training aborted the server in the tokenizer."""
    from ui.app import MAX_CAPTION_BYTES

    ui = app[0].stylelora
    before = listing(ui.datasets_dir)
    bomb = zip_of(tmp_path / "bomb.zip", [("a.png", png_bytes()), ("a.txt", b"\0" * (MAX_CAPTION_BYTES + 1))])
    assert bomb.stat().st_size < 4096
    from gradio_client import handle_file

    with pytest.raises(Exception, match=r"bomb\.zip: caption 'a\.txt' is over the 64 kB caption limit") as e:
        app[2].predict([handle_file(str(bomb))], "bombed", api_name="/import_dataset")
    assert "/tmp/" not in str(e.value)
    loose = tmp_path / "b.txt"  # a caption uploaded beside its image, not zipped
    loose.write_bytes(b"x" * (MAX_CAPTION_BYTES + 1))
    (tmp_path / "b.png").write_bytes(png_bytes())
    refused(ui, r"b\.txt \(64 kB\)", ui.import_dataset, [str(tmp_path / "b.png"), str(loose)], "bombed")
    jsonl = '{"file_name": "a.png", "text": "%s"}\n' % ("y" * MAX_CAPTION_BYTES)
    refused(ui, r"metadata\.jsonl line 1", ui.import_dataset,
            [str(zip_of(tmp_path / "j.zip", [("a.png", png_bytes()), ("metadata.jsonl", jsonl.encode())]))], "bombed")
    assert listing(ui.datasets_dir) == before  # nothing created, no temporary left
    answers(app)


def test_caption_table_echo_capped_and_long_captions_kept(app):
    """A caption over the table's display cap is shown cut and marked; saving the table leaves its
    file alone. A caption over MAX_CAPTION_BYTES already on disk: warned on load, refused by Start."""
    from ui.app import CAPTION_SHOWN, MAX_CAPTION_BYTES

    ui = app[0].stylelora
    ds = ui.datasets_dir / "longcaps"
    ds.mkdir()
    for stem, caption in (("long", "z" * 10_000), ("huge", "\0" * (MAX_CAPTION_BYTES + 10)), ("short", "a cat")):
        (ds / f"{stem}.png").write_bytes(png_bytes())
        (ds / f"{stem}.txt").write_text(caption)
    (ds / "dangling.txt").symlink_to(ds / "nowhere.txt")  # the size scan must not trip on it
    before = listing(ds)
    reply = app[2].predict("longcaps", api_name="/load_captions")
    assert len(json.dumps(reply)) < 4 * CAPTION_SHOWN * 6 + 4000, "the reply echoes whole captions"
    table, note = ui.load_captions("longcaps")
    rows = dict(table)
    assert rows["short.png"] == "a cat" and rows["long.png"].startswith("z" * CAPTION_SHOWN)
    assert "cut: 10000 characters" in rows["long.png"] and len(rows["long.png"]) < CAPTION_SHOWN + 100
    assert "huge.txt (64 kB)" in note and "caption limit" in note
    assert "saved 0 caption(s)" in ui.save_captions("longcaps", table)
    assert listing(ds) == before, "saving the table changed a caption it only showed cut"
    table = [[rel, caption + " edited"] for rel, caption in table]
    note = ui.save_captions("longcaps", table)
    assert "saved 1 caption(s)" in note and "too long to edit here" in note and "long.png" in note
    assert (ds / "short.txt").read_text() == "a cat edited\n"
    assert {k: v for k, v in listing(ds).items() if k != "short.txt"} == \
        {k: v for k, v in before.items() if k != "short.txt"}
    with pytest.raises(Exception, match=r"huge\.txt \(64 kB\).*then start again"):
        app[2].predict("longcaps", "never", "", 10, 4, 1e-3, "attn", api_name="/train")
    assert ui.job is None and not (ui.adapters_dir / "never.safetensors").exists()
    answers(app)


def test_emptied_number_fields_name_the_field(app):
    """Before: an emptied steps/rank/learning-rate (or seed) box gave a TypeError traceback."""
    ui, c = app[0].stylelora, app[2]
    for args, field in (((None, 4, 1e-3), "steps"), ((10, None, 1e-3), "rank"), ((10, 4, None), "learning rate")):
        with pytest.raises(Exception, match=f"{field} is empty: type a number in it"):
            c.predict(DATASET, "empty", "", *args, "attn", api_name="/train")
    with pytest.raises(Exception, match="seed is empty: type a number in it"):
        c.predict(*request(steps=2)[:2], None, *request(steps=2)[3:], api_name="/generate")
    assert ui.job is None and "empty" not in ui.adapter_names()
    answers(app)


def test_prompt_length_capped(app):
    """Before: a 20 MB prompt held a render slot for 92 s and grew the server to 3.9 GB."""
    c = app[2]
    with pytest.raises(Exception, match="prompt is 2001 characters; the limit is 2000"):
        c.predict(*request(prompt="a" * 2001, steps=2), api_name="/generate")
    with pytest.raises(Exception, match="negative prompt is 5000 characters; the limit is 2000"):
        c.predict(*request(negative="b" * 5000, steps=2), api_name="/generate")
    with pytest.raises(Exception, match="sweep strengths is 3000 characters; the limit is 2000"):
        c.predict(*request(steps=2)[:7], "1," * 1500, *request(steps=2)[7:], api_name="/sweep")
    ui = app[0].stylelora
    refused(ui, "trigger words is 2001 characters", ui.start_training, DATASET, "long-trigger", "t" * 2001, 10, 4, 1e-3)
    assert ui.job is None
    c.predict(*request(prompt="a" * 2000, steps=2), api_name="/generate")  # the limit itself is fine
    answers(app)


def test_zip_member_clashes_and_long_names(app, tmp_path):
    """Before: clashing members showed a server path; a 300-character member name a traceback."""
    ui = app[0].stylelora
    before = listing(ui.datasets_dir)
    png = png_bytes()
    cases = [([("a.png", png), ("a.png", png)], r"dup\.zip: member 'a\.png' clashes"),
             ([("x.png", png), ("x.png/y.png", png)], r"nest\.zip: member 'x\.png/y\.png' clashes"),
             ([("n" * 300 + ".png", png)], r"long\.zip: member 'n{60}…n{15}\.png' has a name too long")]
    for (members, match), name in zip(cases, ("dup", "nest", "long")):
        refused(ui, match, ui.import_dataset, [str(zip_of(tmp_path / f"{name}.zip", members))], "clash")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()  # two uploads of one name: gradio keeps each in its own folder
    (tmp_path / "one" / "same.png").write_bytes(png)
    (tmp_path / "two" / "same.png").write_bytes(png_bytes("blue"))
    refused(ui, "uploaded file 'same.png' clashes", ui.import_dataset,
            [str(tmp_path / "one" / "same.png"), str(tmp_path / "two" / "same.png")], "clash")
    refused(ui, "no images in the upload", ui.import_dataset,
            [str(zip_of(tmp_path / "txt.zip", [("a.txt", b"caption only")]))], "clash")
    assert listing(ui.datasets_dir) == before
    answers(app)


def test_imported_dataset_gets_normal_permissions(app, tmp_path):
    """Before: imported dataset folders were 0700 (mkdtemp's mode); now a new folder's (umask)."""
    from stylelora.fileio import _umask

    ui = app[0].stylelora
    ok = zip_of(tmp_path / "ok.zip", [("3_style/a.png", png_bytes()), ("3_style/a.txt", b"a red square")])
    ui.any_folder = False  # and importing works on a UI served beyond this machine
    try:
        _, table, _ = ui.import_dataset([str(ok)], "perms")
    finally:
        ui.any_folder = True
    assert table == [["3_style/a.png", "a red square"]]
    ds = ui.datasets_dir / "perms"
    for folder in (ds, ds / "3_style"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask(), oct(folder.stat().st_mode)
    assert (ds / "3_style" / "a.png").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in ui.datasets_dir.iterdir() if p.name.startswith(".")], "temporary left"


def test_non_safetensors_upload_names_the_file(app, tmp_path):
    """Before: "<temp path> is a pickle-based file", or "<temp path> declares a 7e17-byte header"."""
    ui = app[0].stylelora
    before = listing(ui.adapters_dir)
    pickled = tmp_path / "mystyle.safetensors"
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(1)}, buf)
    pickled.write_bytes(buf.getvalue())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x00\x00\x00\x00\x00\x80\x09" + b"{}" * 100)  # header length ~7e17
    for path in (pickled, junk):
        msg = refused(ui, rf"^{path.name} is not a \.safetensors file", ui.upload, str(path))
        assert "upload a LoRA adapter saved as .safetensors" in msg and "byte header" not in msg
    from gradio_client import handle_file

    with pytest.raises(Exception, match=r"mystyle\.safetensors is not a \.safetensors file") as e:
        app[2].predict(handle_file(str(pickled)), api_name="/upload")
    assert "/tmp/" not in str(e.value) and "gradio" not in str(e.value)
    assert listing(ui.adapters_dir) == before
    answers(app)
