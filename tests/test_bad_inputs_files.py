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
    ("é" * (MAX_CAPTION_BYTES // 2 + 1), r"the caption on metadata\.jsonl line 2 is 65538 bytes, over"),  # not chars
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


# ----------------------------------------------------------------------------- adapter files

OK = {"unet.a.lora_A.weight": torch.ones(1, 2), "unet.a.lora_B.weight": torch.ones(2, 1)}
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
DIFF = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
TE = "encoder.layers.0.mlp.fc1"


def _pair(name: str, a: str = "lora_A", b: str = "lora_B") -> dict[str, torch.Tensor]:
    return {f"{name}.{a}.weight": torch.ones(1, 2), f"{name}.{b}.weight": torch.ones(2, 1)}


def _meta(entry: str, value: str):
    return lambda p: save_file(OK, p, metadata={entry: value})


TWICE = r"x\.safetensors: {} and {} are two spellings of the same LoRA weight, {}, and a loader would silently keep " \
        r"only one; keep one spelling \(re-export the file\)"
NOT_ST = r"x\.safetensors is not a safetensors file: it is {}; stylelora loads LoRA adapters saved as \.safetensors: {}"
ADAPTERS = {  # id: (writer(path), message pattern)
    "metadata-alpha-nan": (_meta("lora_adapter_metadata", '{"unet.lora_alpha": NaN}'),
                           r"x\.safetensors: metadata 'lora_adapter_metadata' holds NaN, which is not a finite number; "
                           r"fix or delete that entry"),
    "metadata-alpha-infinity": (_meta("lora_adapter_metadata", '{"unet.alpha_pattern": {"a": -Infinity}}'),
                                r"metadata 'lora_adapter_metadata' holds -Infinity, which is not a finite number"),
    "metadata-alpha-overflows": (_meta("lora_adapter_metadata", '{"unet.lora_alpha": 1e999}'),
                                 r"metadata 'lora_adapter_metadata' holds 1e999, which is not a finite number"),
    "metadata-alpha-huge-int": (_meta("lora_adapter_metadata", '{"unet.lora_alpha": 1%s}' % ("0" * 60)),
                                r"has unet\.lora_alpha = 10{60}, which must be a number \(finite, within float32's "
                                r"range\); fix or delete that entry"),
    "metadata-alpha-past-float32": (_meta("lora_adapter_metadata", '{"unet.lora_alpha": 1e300}'),
                                    r"has unet\.lora_alpha = 1e\+300, which must be a number \(finite"),
    "metadata-alpha-pattern-bad-regex": (_meta("lora_adapter_metadata", '{"unet.alpha_pattern": {"a(": 2}}'),
                                         r"x\.safetensors: metadata 'lora_adapter_metadata' has "
                                         r"unet\.alpha_pattern key 'a\(', which is not a valid regular expression "
                                         r"\(missing \), unterminated subpattern .*\); fix or delete that entry"),
    "metadata-training-nan": (_meta("stylelora.training", '{"lr": NaN}'),
                              r"metadata 'stylelora\.training' holds NaN, which is not a finite number"),
    "metadata-deeply-nested": (_meta("stylelora.training", "[" * 100_000 + "]" * 100_000),
                               r"metadata 'stylelora\.training' is not valid JSON .*fix or delete that entry"),
    "metadata-int-over-4300-digits": (_meta("stylelora.rank", "1" * 5000),
                                      r"metadata 'stylelora\.rank' is not valid JSON .*fix or delete that entry"),
    "alpha-tensor-nan": (lambda p: save_file({**OK, "unet.a.alpha": torch.tensor(float("nan"))}, p),
                         r"x\.safetensors: tensor unet\.a\.alpha contains NaN/inf values"),
    "alpha-tensor-inf-float16": (lambda p: save_file({**OK, "unet.a.alpha": torch.tensor(7e4).half()}, p),
                                 r"x\.safetensors: tensor unet\.a\.alpha contains NaN/inf values"),
    "alpha-tensor-past-float32": (lambda p: save_file({**OK, "unet.a.alpha": torch.tensor(1e300, dtype=torch.float64)},
                                                      p),
                                  r"x\.safetensors: tensor unet\.a\.alpha holds values beyond float32's range"),
    "alpha-overflows-the-update": (lambda p: save_file({**OK, "unet.a.lora_A.weight": torch.full((1, 2), 10.0)}, p,
                                                       metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 1e38}'}),
                                   r"x\.safetensors: layer unet\.a: its weight update \(up @ down \* alpha / rank, "
                                   r"alpha = 1e\+38\) overflows float32 to inf; the adapter is broken: re-export it"),
    "alpha-tensor-complex": (lambda p: save_file({**OK, "unet.a.alpha": torch.tensor(1 + 2j, dtype=torch.complex64)},
                                                 p),
                             r"x\.safetensors: unet\.a\.alpha is complex64, not a real number \(the layer's alpha\)"),
    "float8-nan": (lambda p: save_file({**OK, "unet.a.lora_A.weight": torch.tensor([[1.0, float("nan")]]).to(
        torch.float8_e4m3fn)}, p), r"x\.safetensors: tensor unet\.a\.lora_A\.weight contains NaN/inf values"),
    "conv-up-not-1x1": (lambda p: save_file({"unet.conv_in.lora_A.weight": torch.ones(2, 1, 1, 1),
                                             "unet.conv_in.lora_B.weight": torch.ones(2, 2, 1, 2)}, p),
                        r"x\.safetensors: layer unet\.conv_in: LoRA down \(2, 1, 1, 1\) and up \(2, 2, 1, 2\) do not "
                        r"pair: .* for a conv layer down \(rank, in, kh, kw\) and up \(out, rank, 1, 1\)"),
    "only-alpha": (lambda p: save_file({"unet.a.alpha": torch.tensor(2.0), "unet.b.alpha": torch.tensor(2.0)}, p),
                   r"no LoRA weights in \S*x\.safetensors: it holds only alpha values \(unet\.a\.alpha, "
                   r"unet\.b\.alpha\), no lora_A/lora_B \(or lora_down/lora_up\) weights; the file is incomplete: "
                   r"re-export it"),
    "only-alpha-kohya": (lambda p: save_file({f"{KOHYA}.alpha": torch.tensor(2.0)}, p),
                         rf"no LoRA weights in \S*x\.safetensors: it holds only alpha values \({KOHYA}\.alpha\)"),
    "twice-bare-and-prefixed": (lambda p: save_file({**_pair(DIFF), **_pair(DIFF.removeprefix("unet."))}, p),
                                TWICE.format(re.escape(DIFF.removeprefix("unet.") + ".lora_A.weight"),
                                             re.escape(DIFF + ".lora_A.weight"), re.escape(DIFF + ".lora_A"))),
    "twice-clip-with-and-without-text-model": (
        lambda p: save_file({**_pair(f"text_encoder.{TE}"), **_pair(f"text_encoder.text_model.{TE}")}, p),
        TWICE.format(re.escape(f"text_encoder.{TE}.lora_A.weight"),
                     re.escape(f"text_encoder.text_model.{TE}.lora_A.weight"), re.escape(f"text_encoder.{TE}.lora_A"))),
    "twice-old-and-new-diffusers": (
        lambda p: save_file({**_pair(f"{DIFF[:-4]}processor.to_k_lora", "down", "up"), **_pair(DIFF)}, p),
        TWICE.format(re.escape(f"{DIFF[:-4]}processor.to_k_lora.down.weight"), re.escape(f"{DIFF}.lora_A.weight"),
                     re.escape(f"{DIFF}.lora_A"))),
    "twice-kohya-and-diffusers": (lambda p: save_file({**_pair(KOHYA, "lora_down", "lora_up"), **_pair(DIFF)}, p),
                                  TWICE.format(re.escape(f"{KOHYA}.lora_down.weight"),
                                               re.escape(f"{DIFF}.lora_A.weight"), re.escape(f"{DIFF}.lora_A"))),
    "twice-kohya-te-and-te1": (
        lambda p: save_file({**_pair("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_down", "lora_up"),
                             **_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_down", "lora_up")}, p),
        TWICE.format(r"lora_te1?_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight",
                     r"lora_te1?_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight",
                     re.escape(f"text_encoder.{TE}.lora_A"))),
    "kohya-and-diffusers-layers-mixed": (
        lambda p: save_file({**_pair(KOHYA, "lora_down", "lora_up"), **_pair("unet.conv_in")}, p),
        rf"x\.safetensors mixes kohya keys \({KOHYA}\.lora_down\.weight\) and diffusers/PEFT keys "
        r"\(unet\.conv_in\.lora_A\.weight\); loaders read one convention per file: re-export it in one"),
    "png-renamed": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
                    NOT_ST.format("a PNG image", r"re-download it, or export the LoRA as \.safetensors")),
    "html-error-page": (lambda p: p.write_bytes(b"\n<!DOCTYPE html><html>Rate limited</html>"),
                        NOT_ST.format(r"an HTML or XML page \(a failed download\?\)", "re-download it")),
    "git-lfs-pointer": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
                        NOT_ST.format("a Git LFS pointer to the file", r"run `git lfs pull` to fetch the file itself")),
    "zip-of-images": (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(22) + b"\x05\x00\x00\x00a.png" + bytes(40)),
                      NOT_ST.format("a zip archive", r"unzip it: the \.safetensors file may be inside")),
    "text-file": (lambda p: p.write_text("these are my lora notes, not weights\n"),
                  NOT_ST.format(r"something else \(it starts with b'these ar'\)", "re-download it")),
    "nine-bytes": (lambda p: p.write_bytes(b"abcdefghi"),
                   NOT_ST.format(r"something else \(it starts with b'abcdefgh'\)", "re-download it")),
}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_bad_adapter_file_is_one_error_naming_it(tmp_path, case):
    write, pattern = ADAPTERS[case]
    path = tmp_path / "x.safetensors"
    write(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=pattern):
        load_adapter(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_the_message_names_no_false_header_size_or_pickle(tmp_path):
    """The outsider's report: a PNG showed 'declares a 727905341920923785-byte header', a zip 'pickle-based'."""
    for name, data in (("a", b"\x89PNG\r\n\x1a\n" + bytes(64)), ("b", b"PK\x03\x04" + bytes(64))):
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_adapter(tmp_path / f"{name}.safetensors")
        assert "byte header" not in str(e.value) and "pickle" not in str(e.value)


def test_torch_zip_is_still_pickle_based(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "x.safetensors", "w") as z:
        z.writestr("style/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match=r"x\.safetensors is a pickle-based file; stylelora only loads \.safetensors"):
        load_adapter(tmp_path / "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_adapter_loads_as_float32_exactly(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    down, up = (torch.randn(2, 8, generator=g) / 4).to(dtype), (torch.randn(8, 2, generator=g) / 4).to(dtype)
    alpha = torch.tensor(4.0).to(dtype)
    save_file({f"{DIFF}.lora_A.weight": down, f"{DIFF}.lora_B.weight": up, f"{DIFF}.alpha": alpha},
              tmp_path / "f8.safetensors")
    layer = load_adapter(tmp_path / "f8.safetensors").layers[DIFF]
    assert layer.down.dtype == layer.up.dtype == torch.float32 and layer.alpha == 4.0
    assert torch.equal(layer.down, down.float()) and torch.equal(layer.up, up.float())
    assert torch.isfinite(layer.delta()).all()


def test_layer_alpha_must_be_finite():
    for alpha in (float("nan"), float("inf"), -float("inf"), 1e39, 10**400, True, "4"):
        with pytest.raises(ValueError, match=r"LoRA alpha is .*: it must be a finite number within float32's range"):
            from stylelora.adapters import LoraFactors

            LoraFactors(torch.ones(1, 2), torch.ones(2, 1), alpha)


def test_nan_alpha_through_the_cli_is_one_error_and_no_invalid_json(tmp_path):
    from test_bad_inputs import assert_one_error, cli

    save_file(OK, tmp_path / "x.safetensors", metadata={"lora_adapter_metadata": '{"unet.lora_alpha": NaN}'})
    done = cli("inspect", "x.safetensors", "--json", cwd=tmp_path)
    assert_one_error(done, r"x\.safetensors: metadata 'lora_adapter_metadata' holds NaN, which is not a finite number")
    assert done.stdout == ""
    (tmp_path / "y.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    assert_one_error(cli("inspect", "y.safetensors", cwd=tmp_path), r"y\.safetensors is not a safetensors file: it is "
                                                                     r"a PNG image")


def test_good_adapters_still_load_and_describe_as_json(tmp_path):
    save_file({**_pair(DIFF), f"{DIFF}.alpha": torch.tensor(2.0)}, tmp_path / "d.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 3.0})})
    ad = load_adapter(tmp_path / "d.safetensors")
    assert ad.layers[DIFF].alpha == 3.0  # the LoraConfig metadata wins over .alpha, as in diffusers
    json.dumps(describe(ad), allow_nan=False)
    save_file(_pair(KOHYA, "lora_down", "lora_up"), tmp_path / "k.safetensors")
    assert load_adapter(tmp_path / "k.safetensors").layers[DIFF].alpha == 1.0
