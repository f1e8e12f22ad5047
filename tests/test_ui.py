"""The Gradio app (ui/app.py) served for real and driven through gradio_client: concurrent sessions
get exactly their solo images, training from the app, adapters tab, path safety, uploads, --auth.
Everything runs on a random tiny base saved once per session, so no pretrained weights are needed."""

from __future__ import annotations

import io
import json
import socket
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ui/ is a top-level folder beside the package, not installed with it
    sys.path.insert(0, str(ROOT))


# --- the app under test ------------------------------------------------------------------------


def make_adapter(pipe, path: Path, seed: int, triggers=(), rank: int = 4, strength: float = 0.5) -> Path:
    """A random (untrained) LoRA on cross-attention and the text encoder, big enough that every
    scale visibly changes the output."""
    from stylelora.adapters import Adapter, LoraFactors, save_adapter, stylelora_metadata
    from stylelora.lora import text_encoder_targets, unet_targets

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for comp, model, names in (("unet", pipe.unet, unet_targets(pipe.unet, "cross-attn")),
                               ("text_encoder", pipe.text_encoder, text_encoder_targets(pipe.text_encoder))):
        mods = dict(model.named_modules())
        for n in names:
            w = mods[n].weight
            layers[f"{comp}.{n.removeprefix('text_model.')}"] = LoraFactors(
                torch.randn(rank, w.shape[1], generator=g) * strength,
                torch.randn(w.shape[0], rank, generator=g) * strength, alpha=rank)
    return save_adapter(Adapter(layers, stylelora_metadata(trigger_words=list(triggers))), path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(app, auth=None) -> str:
    from ui.app import launch_options

    opts = launch_options("127.0.0.1", free_port(), auth, max_file_mb=2)
    app.queue().launch(**opts, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{opts['server_port']}/"


@pytest.fixture(scope="session")
def ui_dirs(tiny_random_pipe, tmp_path_factory) -> dict:
    """adapters/ with two random adapters, datasets/ with one small rendered style folder."""
    from stylelora.world.render import render_batch, styled_caption

    root = tmp_path_factory.mktemp("ui")
    adapters, datasets = root / "adapters", root / "datasets"
    make_adapter(tiny_random_pipe, adapters / "inky.safetensors", 1, triggers=["inky"])
    make_adapter(tiny_random_pipe, adapters / "dotty.safetensors", 2, triggers=["dotty", "dots"])
    ds = datasets / "pastel"
    ds.mkdir(parents=True)
    for i, (scene, img) in enumerate(render_batch(8, 0, "pastel", "flat", 64), 1):
        img.save(ds / f"{i:04d}.png")
        (ds / f"{i:04d}.txt").write_text(styled_caption(scene, "pastel", "flat") + "\n")
    return {"root": root, "adapters": adapters, "datasets": datasets}


@pytest.fixture(scope="session")
def served(tiny_base, ui_dirs):
    """(app, url): one app (one pipe, one AdapterStack) served on a free local port."""
    from ui.app import build_app

    app = build_app(ui_dirs["adapters"], base=str(tiny_base), datasets_dir=ui_dirs["datasets"],
                    max_adapter_mb=1, max_dataset_mb=4)
    url = launch(app)
    yield app, url
    app.close()


def request(prompt="a red star on a white background", seed=0, steps=6, mode="merge", size=64,
            adapters: dict | None = None, negative="", guidance=5.0, slot_names=None) -> list:
    """Positional inputs of the /generate endpoint; adapters = {name: strength or (s, unet, te)}."""
    from ui.app import MAX_SLOTS, Slot

    adapters = adapters or {}
    names = slot_names or ["dotty", "inky"]  # sorted: the slots' order
    fresh, slots = Slot(), []  # a fresh row: the defaults
    for i in range(MAX_SLOTS):
        name = names[i] if i < len(names) else ""
        s = adapters.get(name)
        s, u, t = s if isinstance(s, tuple) else (fresh.strength if s is None else s, fresh.unet, fresh.te)
        slots += Slot(name=name, on=name in adapters, strength=s, unet=u, te=t)
    return [prompt, negative, seed, steps, guidance, size, mode] + slots


def pixels(result) -> np.ndarray:
    """The image of a /generate result, read where the server cached it (same machine)."""
    from PIL import Image

    image = result[0] if isinstance(result, (tuple, list)) else result
    return np.asarray(Image.open(image["path"] if isinstance(image, dict) else image).convert("RGB"))


def client(url, **kw):
    """No downloads: gradio_client 2.7 leaves an empty /tmp/<hex> folder behind per download."""
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, **kw)


# --- tests -------------------------------------------------------------------------------------


def test_adapters_change_the_image_and_zero_strength_is_the_base(served):
    c = client(served[1])
    base = pixels(c.predict(*request(), api_name="/generate"))
    inky = pixels(c.predict(*request(adapters={"inky": 1.0}), api_name="/generate"))
    zero = pixels(c.predict(*request(adapters={"inky": 0.0}), api_name="/generate"))
    tagged = pixels(c.predict(*request(prompt="a red star on a white background <lora:inky:1>"),
                              api_name="/generate"))
    assert not np.array_equal(base, inky)
    assert np.array_equal(base, zero), "strength 0 must give exactly the base image"
    assert np.array_equal(inky, tagged), "<lora:inky:1> in the prompt must equal the slider at 1"
    split = pixels(c.predict(*request(adapters={"inky": (1.0, 1.0, 0.0)}), api_name="/generate"))
    assert not np.array_equal(split, inky) and not np.array_equal(split, base)
    _, settings = c.predict(*request(adapters={"inky": 0.5}), api_name="/generate")
    settings = json.load(open(settings)) if isinstance(settings, str) else settings
    assert settings["adapters"] == {"inky": 0.5} and settings["seed"] == 0


def test_concurrent_sessions_get_their_solo_images(served):
    """Six different requests, each first alone, then all at once from separate clients (twice,
    in shuffled order): every concurrent result must equal its solo result pixel for pixel."""
    url = served[1]
    reqs = [request(seed=1), request(adapters={"inky": 1.0}), request(adapters={"dotty": 1.5}, seed=2),
            request(adapters={"inky": 0.7, "dotty": -0.5}), request(adapters={"inky": (1.0, 0.5, 2.0)}, seed=3),
            request(adapters={"dotty": 1.0}, mode="switch", prompt="dots, a blue circle on a mint background")]
    solo = [pixels(client(url).predict(*r, api_name="/generate")) for r in reqs]
    assert len({a.tobytes() for a in solo}) == len(solo), "the requests must differ to test anything"
    clients = [client(url) for _ in reqs]
    for order in (range(len(reqs)), [3, 0, 5, 1, 4, 2]):
        with ThreadPoolExecutor(len(reqs)) as ex:
            jobs = {i: ex.submit(clients[i].predict, *reqs[i], api_name="/generate") for i in order}
            got = {i: pixels(j.result(timeout=120)) for i, j in jobs.items()}
        for i in order:
            assert np.array_equal(got[i], solo[i]), f"request {i} differs from its solo image"


def rss_mb() -> float:
    """This process's resident memory (the server runs in it), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_load_8_clients_x_10_requests(served):
    """8 clients each send the same 10 requests (changing adapters and strengths) in their own
    order, all at once: all complete, each image equals its solo result, and after one warm-up
    round RSS grows <=10% over 100 further generations. Prints the numbers the README reports
    (run with -s)."""
    import gc

    url = served[1]
    strengths = [-1.0, -0.3, 0.0, 0.25, 0.5, 0.8, 1.0, 1.3, 1.7, 2.0]
    reqs = [request(seed=i, adapters=({"inky": s} if i % 3 == 0 else {"dotty": s} if i % 3 == 1
                                      else {"inky": s, "dotty": 1 - s}), mode="switch" if i == 9 else "merge")
            for i, s in enumerate(strengths)]
    solo_client = client(url)
    solo = [pixels(solo_client.predict(*r, api_name="/generate")) for r in reqs]
    assert len({a.tobytes() for a in solo}) == len(solo), "the requests must differ to test anything"
    clients = [client(url) for _ in range(8)]

    def session(k: int) -> list[tuple[int, np.ndarray]]:
        order = [(k * 3 + j) % len(reqs) for j in range(len(reqs))]  # each client its own rotation
        return [(i, pixels(clients[k].predict(*reqs[i], api_name="/generate"))) for i in order]

    def load_round() -> list[tuple[int, np.ndarray]]:
        with ThreadPoolExecutor(8) as ex:
            return [r for f in [ex.submit(session, k) for k in range(8)] for r in f.result(timeout=600)]

    load_round()  # warm-up: server worker threads, client connections and allocator arenas settle
    gc.collect()
    before = rss_mb()
    t0 = time.time()
    results = load_round()
    seconds = time.time() - t0
    for i, img in results:
        assert np.array_equal(img, solo[i]), f"request {i} under load differs from its solo image"
    for j in range(20):  # 80 concurrent + 20 more = 100 generations since `before`
        solo_client.predict(*reqs[j % len(reqs)], api_name="/generate")
    gc.collect()
    after = rss_mb()
    print(f"\nload: 8 clients x 10 requests, {len(results)} complete, all equal to solo; "
          f"{seconds:.1f} s; RSS {before:.0f} -> {after:.0f} MB over 100 generations "
          f"({after / before - 1:+.1%})")
    assert len(results) == 80
    assert after <= 1.10 * before, f"RSS grew {before:.0f} -> {after:.0f} MB over 100 generations"


def test_sweep_grid(served):
    c = client(served[1])
    grid = pixels(c.predict(*request(adapters={"inky": 1.0, "dotty": 1.0})[:7], "0, 1, 2",
                            *request(adapters={"inky": 1.0, "dotty": 1.0})[7:], api_name="/sweep"))
    assert grid.shape[1] > 3 * 64 * 2 and grid.shape[0] > 2 * 64 * 2  # 2 rows x 3 columns at scale 2


def test_names_never_leave_the_folders(served, ui_dirs, tmp_path):
    from ui.app import safe_child

    ui = served[0].stylelora
    outside = ui_dirs["root"] / "victim.safetensors"
    outside.write_bytes(b"x")
    for bad in ("../victim", "../../etc/passwd", "/etc/passwd", "..", ".hidden", "a/b", "a\\b", ""):
        with pytest.raises(ValueError):
            safe_child(ui.adapters_dir, bad, ".safetensors")
        with pytest.raises((ValueError, FileNotFoundError)):
            ui.delete(bad, True)
        with pytest.raises(ValueError):
            ui.start_training("pastel", bad, "", 5, 4, 1e-3)
        with pytest.raises(ValueError):
            ui.import_dataset([str(outside)], bad)
    assert outside.exists()
    with pytest.raises(ValueError):  # datasets/../adapters exists, but a relative value is a name
        ui.load_captions("../adapters")
    assert ui.load_captions(str(ui_dirs["datasets"] / "pastel"))[0]  # absolute paths are the user's own
    ui.any_folder = False  # ... unless the UI listens beyond this machine (serve() decides from --host)
    try:
        with pytest.raises(ValueError, match="served beyond this machine, so it only reads datasets inside"):
            ui.load_captions(str(ui_dirs["datasets"] / "pastel"))
        assert ui.load_captions("pastel")[0]
    finally:
        ui.any_folder = True
    from ui.app import is_loopback

    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "my-host")] == [False] * 4
    # and through the server: a crafted slot name is an error, not a file read
    with pytest.raises(Exception, match="not a usable name"):
        client(served[1]).predict(*request(adapters={"../victim": 1.0}, slot_names=["../victim"]),
                                  api_name="/generate")


def test_zip_upload_is_confined_and_limited(served, ui_dirs, tmp_path):
    from PIL import Image

    ui = served[0].stylelora
    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, "PNG")

    def zip_of(members: dict) -> Path:
        path = tmp_path / f"u{len(list(tmp_path.iterdir()))}.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                if name.startswith("@link:"):
                    info = zipfile.ZipInfo(name[6:])
                    info.external_attr = 0o120777 << 16
                    z.writestr(info, data)
                else:
                    z.writestr(name, data)
        return path

    for evil in ({"../evil.png": png.getvalue()}, {"/abs.png": png.getvalue()},
                 {"@link:a.png": "/etc/passwd"}):
        with pytest.raises(ValueError, match="refusing this zip"):
            ui.import_dataset([str(zip_of(evil))], "evil")
    assert not (ui_dirs["datasets"] / "evil").exists() and not (ui_dirs["root"] / "evil.png").exists()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", b"\0" * (5 * 2**20))  # 5 MB unpacked, a few kB packed; limit is 4 MB
    with pytest.raises(ValueError, match="upload limit"):
        ui.import_dataset([str(bomb)], "bomb")
    ok = zip_of({"3_style/a.png": png.getvalue(), "3_style/a.txt": "a red square", "__MACOSX/._a.png": b"junk"})
    choices, table, _ = ui.import_dataset([str(ok)], "zipped")
    assert table == [["3_style/a.png", "a red square"]]
    table[0][1] = "pastel, a red square"
    assert "saved 1" in ui.save_captions("zipped", table)
    assert (ui_dirs["datasets"] / "zipped" / "3_style" / "a.txt").read_text().strip() == "pastel, a red square"
    with pytest.raises(ValueError, match="not an image"):
        ui.save_captions("zipped", [["../../victim", "x"]])
    assert not [p for p in ui_dirs["datasets"].iterdir() if p.name.startswith(".")], "temp folders left"


def test_server_refuses_oversized_uploads(served):
    import httpx

    url = served[1] + "gradio_api/upload"
    small = httpx.post(url, files={"files": ("a.safetensors", b"x" * 1000)})
    big = httpx.post(url, files={"files": ("a.safetensors", b"x" * (3 * 2**20))})  # limit: 2 MB
    assert small.status_code == 200 and big.status_code == 413, (small.status_code, big.status_code)


def test_adapter_upload_validated(served, tiny_random_pipe, tmp_path):
    import shutil

    from stylelora.fileio import _umask

    ui = served[0].stylelora
    pickled = tmp_path / "evil.ckpt"
    torch.save({"x": torch.zeros(1)}, pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    for bad, why in ((pickled, "pickle"), (disguised, "pickle"), (tmp_path / "missing.safetensors", "No such file")):
        with pytest.raises((ValueError, FileNotFoundError), match=why):
            ui.upload(str(bad))
    big = make_adapter(tiny_random_pipe, tmp_path / "big.safetensors", 5, rank=64)
    assert big.stat().st_size > ui.max_adapter_bytes
    with pytest.raises(ValueError, match="limit"):
        ui.upload(str(big))
    good = make_adapter(tiny_random_pipe, tmp_path / "fresh upload.safetensors", 6)
    assert "fresh_upload" in ui.upload(str(good))
    assert "fresh_upload" in ui.adapter_names() and not ui.adapter_names().count(".fresh_upload")
    with pytest.raises(FileExistsError):
        ui.upload(str(good))
    # Two requests racing for one new name: the one that finishes second must not replace the first.
    other = make_adapter(tiny_random_pipe, tmp_path / "racer.safetensors", 7)
    first = make_adapter(tiny_random_pipe, tmp_path / "first.safetensors", 8)

    def slow_write(tmp):  # while this upload writes, another one takes the name
        ui.upload(str(first))
        shutil.copyfile(other, tmp)

    first_bytes = first.read_bytes()
    with pytest.raises(FileExistsError, match="an adapter named 'first' exists"):
        ui._publish("first", slow_write)
    published = ui.adapters_dir / "first.safetensors"
    assert published.read_bytes() == first_bytes
    assert not [p.name for p in ui.adapters_dir.iterdir() if p.name.startswith(".first")]
    assert published.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's owner-only 0600
    ui.delete("first", True)


def test_adapters_tab_inspect_convert_merge_delete(served):
    ui = served[0].stylelora
    info = ui.inspect("inky")
    assert info["trigger_words"] == ["inky"] and info["rank"] == 4
    assert "inky-kohya" in ui.convert("inky", "kohya", "")
    assert ui.inspect("inky-kohya")["format"] == "kohya"
    ui.convert("inky-kohya", "diffusers", "inky-back")
    assert ui.inspect("inky-back")["n_targets"] == info["n_targets"]
    assert "merged" in ui.merge(["inky", "dotty"], "0.5, 0.5", "merged", None)
    assert "merged" in ui.adapter_names()
    with pytest.raises(ValueError, match="confirmation"):
        ui.delete("merged", False)
    ui.generate(*request(adapters={"merged": 1.0}, slot_names=["merged"]))  # loaded into the stack
    ui.delete("merged", True)
    assert "merged" not in ui.adapter_names() and "merged" not in ui.stack.names
    for n in ("inky-kohya", "inky-back"):
        ui.delete(n, True)


def test_training_from_the_app(served, ui_dirs):
    """Start a short run through the API, poll like the page does, find the adapter listed."""
    ui = served[0].stylelora
    c = client(served[1])
    c.predict("pastel", "quick", "pastel", 12, 4, 1e-3, "attn", api_name="/train")
    with pytest.raises(Exception, match="running|exists"):
        ui.start_training("pastel", "quick2", "", 10, 4, 1e-3)  # one run at a time
    t0 = time.time()
    while ui.job.running and time.time() - t0 < 90:
        time.sleep(0.5)
    assert not ui.job.running and ui.job.error is None, ui.job.error
    assert ui.job.step == 12 and ui.job.rows and ui.job.sample
    from ui.app import MAX_SLOTS

    out = ui.poll(*([""] * MAX_SLOTS), None, [])
    assert "12/12" in out[0] and "done" in out[0]
    assert "quick" in ui.adapter_names() and ui.triggers("quick") == ["pastel"]
    from stylelora.adapters import load_adapter

    trained = {k for k in load_adapter(ui.adapters_dir / "quick.safetensors").targets if k.startswith("unet.")}
    assert any(".attn1." in k for k in trained) and any(".attn2." in k for k in trained)  # the targets picked
    img = pixels(c.predict(*request(adapters={"quick": 1.0}, slot_names=["quick"]), api_name="/generate"))
    assert img.shape == (64, 64, 3)
    ui.delete("quick", True)


def test_generation_during_training_and_stop(served):
    """Generating while a run trains (its own pipe, same process) gives the solo image; Stop
    ends the run early and still writes the adapter."""
    ui = served[0].stylelora
    c = client(served[1])
    solo = pixels(c.predict(*request(adapters={"inky": 1.0}, seed=7), api_name="/generate"))
    ui.start_training("pastel", "stopped", "", 2000, 4, 1e-3)
    t0 = time.time()
    while ui.job.step < 2 and ui.job.running and time.time() - t0 < 60:
        time.sleep(0.2)
    during = pixels(c.predict(*request(adapters={"inky": 1.0}, seed=7), api_name="/generate"))
    assert ui.job.running and np.array_equal(during, solo)
    ui.stop_training()
    ui.job.thread.join(60)
    assert "stopped early" in ui.job.state and ui.job.step < 2000
    assert "stopped" in ui.adapter_names()
    ui.delete("stopped", True)


def test_a_run_saved_under_a_free_name_shows_it(served, monkeypatch):
    """train() returns NAME-2.safetensors when another write took NAME meanwhile: the status names
    the file it wrote and the Adapters tab's picker moves to it."""
    import shutil

    import stylelora.train
    from ui.app import MAX_SLOTS

    ui = served[0].stylelora
    out, saved = ui.adapters_dir / "taken.safetensors", ui.adapters_dir / "taken-2.safetensors"

    def fake_train(cfg, on_log, should_stop):
        assert Path(cfg.out) == out
        on_log({"step": 3, "steps": 3, "loss": 0.1, "lr": 1e-3, "steps_per_s": 1.0})
        shutil.copy(ui.adapters_dir / "inky.safetensors", out)  # an upload under the same name
        shutil.copy(ui.adapters_dir / "inky.safetensors", saved)
        return saved

    monkeypatch.setattr(stylelora.train, "train", fake_train)
    ui.start_training("pastel", "taken", "", 3, 4, 1e-3)
    ui.job.thread.join(30)
    polled = ui.poll(*([""] * MAX_SLOTS), "inky", [])
    assert ui.job.saved == saved and ui.job.error is None
    assert "3/3" in polled[0] and "done; saved as " in polled[0]
    assert "taken-2.safetensors: taken.safetensors was taken while it trained" in polled[0]
    assert polled[-2]["value"] == "taken-2" and "taken-2" in polled[-2]["choices"]
    ui.delete("taken", True)
    ui.delete("taken-2", True)


def test_auth_refuses_a_wrong_password(tiny_base, ui_dirs):
    import httpx

    from ui.app import build_app, launch_options

    with pytest.raises(ValueError, match="USER:PASS"):
        launch_options(auth="nopassword")
    app = build_app(ui_dirs["adapters"], base=str(tiny_base), datasets_dir=ui_dirs["datasets"])
    url = launch(app, auth="alice:s3cret")
    try:
        assert httpx.get(url + "config").status_code == 401
        assert httpx.post(url + "login", data={"username": "alice", "password": "wrong"}).status_code >= 400
        with pytest.raises(ValueError, match=r"Could not login to http://127\.0\.0\.1:\d+/"):
            client(url, auth=("alice", "wrong"))
        ok = client(url, auth=("alice", "s3cret"))
        assert pixels(ok.predict(*request(steps=2), api_name="/generate")).shape == (64, 64, 3)
    finally:
        app.close()


def test_cli_ui_subcommand(monkeypatch):
    from stylelora.cli import build_parser, main

    monkeypatch.delenv("STYLELORA_UI_AUTH", raising=False)  # the flag's default comes from it
    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.adapters, args.auth) == ("127.0.0.1", 7860, "adapters", None)
    assert main(["ui", "--auth", "no-colon"]) == 2  # refused before any model loads


def test_trigger_button_appends_missing_tags(served):
    ui = served[0].stylelora
    assert ui.add_triggers("a red star", "dotty") == "a red star, dotty, dots"
    assert ui.add_triggers("a red star, dots,", "dotty") == "a red star, dots, dotty"
    assert ui.add_triggers("a dotsy star", "dotty") == "a dotsy star, dotty, dots"  # whole tags, not substrings
    assert ui.add_triggers("", "inky") == "inky"


def test_on_ticks_an_adapter_when_the_page_opens(served, monkeypatch):
    """`stylelora ui --on NAME` (make demo: the adapter it trained) starts that row ticked; others stay off."""
    from stylelora.cli import build_parser
    from ui.app import MAX_SLOTS, SLOT_OUTPUTS

    assert build_parser().parse_args(["ui", "--on", "dotty"]).on == ["dotty"]
    ui = served[0].stylelora
    monkeypatch.setattr(ui, "enabled", {"dotty"})
    out = ui.refresh(*([""] * MAX_SLOTS), None, [])
    rows = [out[i * SLOT_OUTPUTS:(i + 1) * SLOT_OUTPUTS] for i in range(MAX_SLOTS)]
    ticked = {row[1]: row[2]["value"] for row in rows if row[1]}  # (group, name, on, ...) per row
    assert ticked["dotty"] is True and ticked["inky"] is False
    assert [name for name, on in ticked.items() if on] == ["dotty"]  # other tests' uploads stay off too
