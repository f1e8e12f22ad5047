"""Bad files in a dataset folder and bad adapter files, second pass (issue 14): huge or binary
captions, run folders inside the dataset, names that are not UTF-8, broken links and link loops;
adapters with NaN alpha, float8 tensors, no LoRA weights, one layer under two spellings, or not a
safetensors file at all.

Same rule as test_bad_inputs.py: one report line naming the file and why (the good files still
train), or one ValueError naming the file and the fix -- never a traceback or a crash.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stylelora.adapters import describe, load_adapter
from stylelora.data import MAX_CAPTION_BYTES, RUN_MARKER, CaptionFolder, discover

from test_data import solid

RED, BLUE = (255, 0, 0), (0, 0, 255)


def skip_lines(data: CaptionFolder) -> list[str]:
    report = data.report
    report.encode("utf-8")  # printable as is: no surrogate escapes of undecodable names
    return [line for line in report.splitlines() if line.startswith("skipped")]


def assert_good_one_still_trains(data: CaptionFolder, rels=("good.png",)) -> None:
    assert [it.rel for it in data.items] == list(rels)
    assert data[0]["pixel_values"].shape[0] == 3
    data.fingerprint()  # encodes every name and caption: must not raise


@pytest.fixture
def good(tmp_path) -> Path:
    solid(tmp_path / "good.png", caption="outline, a red square")
    return tmp_path


# ----------------------------------------------------------------------------- captions

def test_caption_cap_is_public_and_64_kib():
    assert MAX_CAPTION_BYTES == 64 * 1024


@pytest.mark.parametrize("size", [100 * 2**20, 500 * 2**20])
def test_huge_caption_is_skipped_by_size_without_reading_it(good, size, monkeypatch):
    solid(good / "big.png")
    with open(good / "big.txt", "wb") as f:  # sparse: 500 MB of NULs that cost no disk and no time
        f.truncate(size)
    real_open = open

    def no_big_reads(file, *args, **kwargs):
        assert not str(file).endswith("big.txt"), "the oversized caption was opened"
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_big_reads)
    t0 = time.perf_counter()
    data = CaptionFolder(good)
    assert time.perf_counter() - t0 < 10
    assert skip_lines(data) == [f"skipped {good / 'big.png'}: caption big.txt is {size} bytes, over "
                                f"MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES}; a caption is a line of tags that the "
                                "text encoder reads 77 tokens of: shorten it"]
    assert_good_one_still_trains(data)


def test_caption_at_the_cap_trains_and_one_byte_more_is_skipped(good):
    solid(good / "at.png")
    (good / "at.txt").write_bytes(b"a" * MAX_CAPTION_BYTES)
    solid(good / "over.png")
    (good / "over.txt").write_bytes(b"a" * (MAX_CAPTION_BYTES + 1))
    data = CaptionFolder(good)
    assert [it.rel for it in data.items] == ["at.png", "good.png"]
    assert len(data.items[0].caption) == MAX_CAPTION_BYTES
    assert skip_lines(data) == [f"skipped {good / 'over.png'}: caption over.txt is {MAX_CAPTION_BYTES + 1} bytes, "
                                f"over MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES}; a caption is a line of tags that "
                                "the text encoder reads 77 tokens of: shorten it"]


@pytest.mark.parametrize("data", [b"\0" * 100, b"a\0b", "a red star".encode("utf-16-le")],
                         ids=["all-nul", "one-nul", "utf16-without-bom"])
def test_caption_with_nul_bytes_is_skipped(good, data):
    solid(good / "n.png")
    (good / "n.txt").write_bytes(data)
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good / 'n.png'}: caption n.txt holds NUL bytes (UTF-16, or not text?); "
                                "re-save it as UTF-8 text"]
    assert_good_one_still_trains(data)


def test_utf16_with_a_bom_is_still_not_utf8(good):
    solid(good / "n.png")
    (good / "n.txt").write_bytes("a red star".encode("utf-16"))
    assert discover(good)[1] == [(good / "n.png", "caption n.txt is not UTF-8; re-save it as UTF-8")]


def _jsonl(root: Path, *rows: dict) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("text, reason", [
    ("a" * (MAX_CAPTION_BYTES + 1), rf"the caption on metadata\.jsonl line 2 is {MAX_CAPTION_BYTES + 1} bytes, over "
                                    rf"MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES}; .*shorten it"),
    ("é" * (MAX_CAPTION_BYTES // 2 + 1), r"the caption on metadata\.jsonl line 2 is 65538 bytes, over"),  # bytes, not chars
    ("a\0b", r"the caption on metadata\.jsonl line 2 holds NUL bytes \(UTF-16, or not text\?\); re-save it"),
    ("a \ud800 b", r"the caption on metadata\.jsonl line 2 holds \\ud800, which is not a character \(a lone "
                   r"surrogate\); fix the text"),
], ids=["over-cap", "over-cap-in-utf8-bytes", "nul", "lone-surrogate"])
def test_bad_metadata_caption_skips_its_image(good, text, reason):
    solid(good / "m.png")
    _jsonl(good, {"file_name": "good.png", "text": "from jsonl"}, {"file_name": "m.png", "text": text})
    data = CaptionFolder(good)
    lines = skip_lines(data)
    assert len(lines) == 1 and lines[0].startswith(f"skipped {good / 'm.png'}: "), lines
    assert re.search(reason, lines[0]), lines[0]
    assert_good_one_still_trains(data)
    assert data.items[0].caption == "from jsonl"


def test_metadata_line_too_long_for_any_caption_is_one_error(good):
    _jsonl(good, {"file_name": "good.png", "text": "x" * (8 * MAX_CAPTION_BYTES)})
    with pytest.raises(ValueError, match=rf"metadata\.jsonl line 1 is over {8 * MAX_CAPTION_BYTES} characters, more "
                                         rf"than a caption of at most MAX_CAPTION_BYTES = {MAX_CAPTION_BYTES} bytes "
                                         r"needs: shorten its text"):
        discover(good)


def test_metadata_naming_a_missing_file_with_a_lone_surrogate_is_printable(good):
    _jsonl(good, {"file_name": "gh\udc00st.png", "text": "x"})
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good}/gh\\udc00st.png: named on metadata.jsonl line 1 but not found "
                                "among the images; fix its file_name (relative to the dataset folder)"]


def test_metadata_with_unicode_line_separators_in_a_caption(good):
    """U+2028 is legal inside a JSON string: it must not split the line (str.splitlines did)."""
    (good / "metadata.jsonl").write_text('{"file_name": "good.png", "text": "a\u2028b"}\n', encoding="utf-8")
    assert discover(good)[0][0].caption == "a\u2028b"


# ----------------------------------------------------------------------------- run folders

def _fake_run(run: Path, loss_header: bool = True) -> None:
    """What train leaves in a run folder: loss log and plot, sample grids, a checkpoint."""
    solid(run / "samples" / "step-000001.png", (32, 32), BLUE)
    solid(run / "loss.png", (32, 32), BLUE)
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "loss.csv").write_text("step,loss,lr\n1,0.5,0.001\n" if loss_header else "a,b\n")


@pytest.mark.parametrize("name, header", [("style.run", True), ("STYLE.RUN", False), ("my-runs", True)],
                         ids=["out-dot-run", "dot-run-any-contents", "run-dir-by-contents"])
def test_run_folder_inside_the_dataset_is_skipped_once(good, name, header):
    before = CaptionFolder(good).fingerprint()
    _fake_run(good / name, header)
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good / name}: a stylelora run folder (loss curve, sample grids, "
                                "checkpoints), not training data: not searched. Keep runs out of the dataset "
                                "(--out or --run-dir elsewhere)"]
    assert_good_one_still_trains(data)
    assert data.fingerprint() == before


def test_run_marker_marks_a_run_folder_whatever_its_name(good):
    solid(good / "outputs" / "grid.png")
    (good / "outputs" / RUN_MARKER).write_text("")
    assert [p.name for p, _ in discover(good)[1]] == ["outputs"]


def test_folders_that_only_look_a_bit_like_runs_are_searched(good):
    solid(good / "samples" / "a.png", caption="x")  # a folder named samples is data
    solid(good / "style.run" / "b.png", caption="x")  # .run without loss log, samples or checkpoints
    solid(good / "logs" / "c.png", caption="x")
    (good / "logs" / "loss.csv").write_text("step,loss,lr\n")  # a loss log without samples/checkpoints
    items, skipped = discover(good)
    assert [it.rel for it in items] == ["good.png", "logs/c.png", "samples/a.png", "style.run/b.png"]
    assert skipped == []


def test_training_twice_into_the_dataset_folder_then_resuming(tmp_path, tiny_base):
    """`stylelora train . --out style.safetensors` twice, then --resume: the second run must not train
    on the first one's sample grids and loss plot, and the resume must not see "changed images"."""
    from stylelora.train import TrainConfig, train

    data = tmp_path / "data"
    solid(data / "a.png", (64, 64), RED, caption="outline, a red square")
    solid(data / "b.png", (64, 64), BLUE, caption="outline, a blue square")
    common = dict(dataset=str(data), out=str(data / "style.safetensors"), base=str(tiny_base), batch_size=1, rank=1,
                  sample_every=1, checkpoint_every=1, progress=False, device="cpu")
    train(TrainConfig(steps=2, **common))
    assert list((data / "style.run" / "samples").glob("*.png")) and (data / "style.run" / "loss.png").is_file()
    again = CaptionFolder(data)
    assert [it.rel for it in again.items] == ["a.png", "b.png"]
    assert [p.name for p, _ in again.skipped] == ["style.run"]
    train(TrainConfig(steps=2, **common))
    out = train(TrainConfig(steps=3, resume=str(data / "style.run"), **common))
    assert load_adapter(out).layers


# ----------------------------------------------------------------------------- names and links

def test_file_name_that_is_not_utf8_is_skipped_naming_it(good):
    bad = os.path.join(os.fsencode(good), b"caf\xe9.png")
    solid(Path(os.fsdecode(bad)))
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good}/caf\\xe9.png: file name is not UTF-8 (b'caf\\xe9.png'); rename it "
                                "with UTF-8 characters to train it"]
    assert_good_one_still_trains(data)


def test_folder_name_that_is_not_utf8_is_skipped_once(good):
    folder = Path(os.fsdecode(os.path.join(os.fsencode(good), b"3_\xff\xfe")))
    solid(folder / "a.png", caption="x")
    solid(folder / "b.png", caption="y")
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good}/3_\\xff\\xfe: folder name is not UTF-8 (b'3_\\xff\\xfe'); rename "
                                "it with UTF-8 characters to train its images"]
    assert_good_one_still_trains(data)


def test_broken_link_and_link_loops_are_skipped_one_line_each(good):
    os.symlink("nowhere.png", good / "broken.png")
    os.symlink("loop.png", good / "loop.png")
    os.symlink("pong.png", good / "ping.png")
    os.symlink("ping.png", good / "pong.png")
    os.symlink(".", good / "again")  # a folder link back to the dataset
    solid(good / "elsewhere" / "x.png")
    os.symlink("elsewhere/x.png", good / "linked.png")  # a working link to an image is fine
    data = CaptionFolder(good)
    assert skip_lines(data) == [
        f"skipped {good / 'again'}: a link to a folder: links to folders are not followed (they can loop or lead out "
        "of the dataset); move or copy the images into the dataset",
        f"skipped {good / 'broken.png'}: a broken link: its target 'nowhere.png' does not exist; fix or delete "
        "the link",
        f"skipped {good / 'loop.png'}: a link loop (it points to 'loop.png', which never reaches a file); fix or "
        "delete the link",
        f"skipped {good / 'ping.png'}: a link loop (it points to 'pong.png', which never reaches a file); fix or "
        "delete the link",
        f"skipped {good / 'pong.png'}: a link loop (it points to 'ping.png', which never reaches a file); fix or "
        "delete the link"]
    assert_good_one_still_trains(data, ("elsewhere/x.png", "good.png", "linked.png"))


def test_a_pipe_named_like_an_image_is_skipped_not_waited_on(good):
    os.mkfifo(good / "pipe.png")
    data = CaptionFolder(good)
    assert skip_lines(data) == [f"skipped {good / 'pipe.png'}: not a regular file (a pipe, socket or device); "
                                "delete it or replace it with the image"]


def test_only_bad_files_is_still_one_error(tmp_path):
    os.symlink("nowhere.png", tmp_path / "broken.png")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no usable image in .*: 2 file\(s\) skipped \(a\.png: empty file.*"
                                         r"broken\.png: a broken link.*fix or replace them"):
        CaptionFolder(tmp_path)
