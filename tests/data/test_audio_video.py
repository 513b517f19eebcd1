"""Tests for the audio and video readers (folder, built-ins, webdataset), media outputs and audio losses."""

import io
import shutil
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from data import build_dataset, collate_samples
from data.audio import (SPOKEN_EVAL_VOICES, SPOKEN_PITCHES, SPOKEN_SPEEDS, SPOKEN_TRAIN_VOICES, loudest_start,
                        window)
from data.builtin import digits_indices
from data.video import frames_to_clip, read_frames
from data.files import read_input, write_output
from data.pictures import save_comparison, write_samples
from stage1_tokenizer.audio_loss import MultiResolutionSTFTLoss, mel_distance


def _sine(seconds, rate, freq=440.0, amp=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _audio(source, **kw):
    return build_dataset(str(source), modality="audio", channels=1, **{"eval_fraction": 0, **kw})


def _video(source, **kw):
    return build_dataset(str(source), modality="video", **{"eval_fraction": 0, **kw})


def _squares(frames=20, h=40, w=48):
    """uint8 (T, H, W, 3): a white 8x8 square moving right by 2 px per frame on a dark red background."""
    video = np.zeros((frames, h, w, 3), np.uint8)
    video[..., 0] = 60
    for t in range(frames):
        video[t, 10:18, 2 * t : 2 * t + 8] = 255
    return video


def _write_mp4(path, video, fps=10):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_gif(path, frames=7, side=30):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)) for _ in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


# ---------------------------------------------------------------- audio folder


@pytest.fixture
def audio_tree(tmp_path):
    """root/{music,speech}/...: 8 kHz, 44.1 kHz stereo, FLAC; a corrupt, an empty and a 0-frame file."""
    (tmp_path / "speech" / "deep").mkdir(parents=True)
    (tmp_path / "music").mkdir()
    sf.write(tmp_path / "speech" / "a_8k.wav", _sine(1.0, 8000), 8000)
    stereo = np.stack([_sine(0.5, 44100, amp=0.5), _sine(0.5, 44100, amp=0.3)], axis=1)
    sf.write(tmp_path / "speech" / "deep" / "b_44k_stereo.WAV", stereo, 44100)
    sf.write(tmp_path / "music" / "c.FLAC", _sine(0.3, 16000, 220.0), 16000)
    (tmp_path / "music" / "d_corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(200)))
    (tmp_path / "music" / "e_empty.flac").write_bytes(b"")
    sf.write(tmp_path / "music" / "f_noframes.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    return tmp_path


def test_audio_folder_resample_mono_labels_and_skips(audio_tree):
    ds = _audio(audio_tree, split="eval", size=8000, sample_rate=16000)
    assert ds.classes == ["music", "speech"]
    assert ds.files == ["music/c.FLAC", "music/d_corrupt.wav", "music/e_empty.flac", "music/f_noframes.wav",
                        "speech/a_8k.wav", "speech/deep/b_44k_stereo.WAV"]
    assert ds.read(4).shape == (1, 16000)  # 1 s at 8 kHz -> 16000 samples before cropping
    stereo = ds.read(5)
    assert stereo.shape == (1, 8000) and abs(stereo.abs().max().item() - 0.4) < 0.02  # channel mean
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))]
    for s in samples:
        assert s["x"].shape == (1, 8000) and s["x"].dtype == torch.float32
        assert s["x"].abs().max() <= 1.0
    flac = samples[0]["x"]
    assert flac[:, :4800].abs().max() > 0.4 and flac[:, 4800:].abs().max() == 0  # 0.3 s, zero-padded
    bad = [str(audio_tree / "music" / n) for n in ("d_corrupt.wav", "e_empty.flac", "f_noframes.wav")]
    messages = " ".join(str(w.message) for w in caught)
    assert all(f"skipping unreadable audio file {p}" in messages for p in bad)
    assert [s["key"] for s in samples[1:5]] == ["speech/a_8k.wav"] * 4
    assert samples[1]["skipped"] == bad and samples[3]["skipped"] == bad[2:] and samples[4]["skipped"] == []
    assert [s["label"] for s in samples] == [0, 1, 1, 1, 1, 1]
    batch = collate_samples(samples)
    assert batch["x"].shape == (6, 1, 8000) and len(batch["skipped"]) == 6
    assert torch.equal(ds[5]["x"], ds[5]["x"])  # eval crops are deterministic


def test_audio_folder_train_crops_use_global_rng(audio_tree):
    ds = _audio(audio_tree / "speech", split="train", size=4000, sample_rate=16000)
    assert ds.classes == ["deep"] and [ds.labels[0], ds.labels[1]] == [-1, 0]
    torch.manual_seed(1)
    first = ds[0]["x"]
    torch.manual_seed(1)
    assert torch.equal(first, ds[0]["x"]) and first.shape == (1, 4000)
    (audio_tree / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        _audio(audio_tree / "empty")
    with pytest.raises(ValueError, match="spoken-digits.*directory.*tar"):
        _audio("no/such/source")
    with pytest.raises(ValueError, match="mono"):
        build_dataset(str(audio_tree), modality="audio", channels=3)


# ---------------------------------------------------------------- spoken-digits


@pytest.fixture(scope="module")
def spoken():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); spoken-digits needs it")
    return (_audio("spoken-digits", split="train", size=8192), _audio("spoken-digits", split="eval", size=8192))


def test_spoken_digits_splits_and_shapes(spoken):
    train, held = spoken
    styles = len(SPOKEN_SPEEDS) * len(SPOKEN_PITCHES)
    assert len(train) == 10 * styles * len(SPOKEN_TRAIN_VOICES) and len(held) == 10 * styles * len(SPOKEN_EVAL_VOICES)
    assert set(train.labels) == set(held.labels) == set(range(10))
    train_voices = {train[i]["key"].split("/")[1] for i in range(0, len(train), 7)}
    eval_voices = {held[i]["key"].split("/")[1] for i in range(len(held))}
    assert eval_voices == set(SPOKEN_EVAL_VOICES) and train_voices.isdisjoint(eval_voices)
    s = held[17]
    assert s["x"].shape == (1, 8192) and 0.5 < s["x"].abs().max() <= 1.0
    assert s["label"] == held.clips[17]["label"] and held.clips[17]["word"] in s["key"]
    again = _audio("spoken-digits", split="eval", size=8192)
    assert torch.equal(again[17]["x"], s["x"])  # deterministic eval crop (and the cache is reused)
    lengths = [w.shape[-1] for w in held.waves]
    assert 0.2 * 16000 < min(lengths) and max(lengths) < 1.0 * 16000


def test_spoken_digits_other_rate(spoken):
    _, held = spoken
    slow = _audio("spoken-digits", split="eval", size=4096, sample_rate=8000)
    assert slow[3]["x"].shape == (1, 4096)
    assert abs(slow.waves[3].shape[-1] - held.waves[3].shape[-1] / 2) <= 1


def test_spoken_digits_training_windows_can_be_the_loudest(spoken):
    """``window="loudest"`` (a data option) cuts each training clip where eval cuts a held-out one: deterministic,
    the whole word where it fits; the default draws a random window."""
    train, _ = spoken
    loud = _audio("spoken-digits", split="train", size=8192, window="loudest")
    torch.manual_seed(0)
    assert torch.equal(loud[5]["x"], loud[5]["x"]) and loud[5]["key"] == train[5]["key"]
    assert torch.equal(loud[5]["x"], window(loud.waves[5], 8192, loudest_start(loud.waves[5], 8192)))
    draws = [train[5]["x"] for _ in range(6)]
    assert any(not torch.equal(d, draws[0]) for d in draws[1:])
    with pytest.raises(ValueError, match="window must be one of"):
        _audio("spoken-digits", split="train", size=8192, window="centre")


def test_spoken_digits_needs_espeak(tmp_path, monkeypatch):
    import data.audio as audio

    monkeypatch.setenv("TOKGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(audio.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="espeak-ng.*not installed.*apt-get install espeak-ng"):
        _audio("spoken-digits", split="eval", size=8192)


@pytest.mark.slow
def test_spoken_digits_generation_is_atomic(tmp_path, monkeypatch):
    import data.audio as audio

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); spoken-digits needs it")
    monkeypatch.setenv("TOKGEN_CACHE", str(tmp_path))
    (tmp_path / "spoken-digits").mkdir()  # a stale cache (no manifest) is replaced
    manifest = audio.spoken_digits_manifest()
    assert len(manifest["clips"]) == 2400 and manifest["generated_seconds"] < 120
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spoken-digits"]  # no temporary folders left
    stamp = (tmp_path / "spoken-digits" / "manifest.json").stat().st_mtime_ns
    audio.spoken_digits_manifest()
    assert (tmp_path / "spoken-digits" / "manifest.json").stat().st_mtime_ns == stamp  # reused


# ---------------------------------------------------------------- video folder


@pytest.fixture
def video_tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write_mp4(tmp_path / "a" / "squares.mp4", _squares())
    _write_gif(tmp_path / "b" / "anim.gif")
    (tmp_path / "b" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))
    return tmp_path


def test_video_folder_clips_and_skips(video_tree):
    broken = str(video_tree / "b" / "broken.mp4")
    with pytest.warns(UserWarning, match="broken.mp4"):
        ds = _video(video_tree, split="eval", size=16, channels=3, frames=4, frame_stride=3)
    assert ds.unindexed == [broken] and ds.classes == ["a", "b"]
    assert ds.num_frames == {"a/squares.mp4": 20, "b/anim.gif": 7}
    assert len(ds) == 6 + 2  # starts 0, 3, ..., 16 and 0, 3
    samples = [ds[i] for i in range(len(ds))]
    assert [s["key"] for s in samples[:2]] == ["a/squares.mp4@0", "a/squares.mp4@3"]
    assert [s["label"] for s in samples] == [0] * 6 + [1] * 2
    assert samples[0]["skipped"] == [broken] and all(s["skipped"] == [] for s in samples[1:])
    for s in samples:
        assert s["x"].shape == (3, 4, 16, 16) and 0 <= s["x"].min() and s["x"].max() <= 1
    expected = frames_to_clip(read_frames(video_tree / "a" / "squares.mp4")[3:7], 16, 3, train=False)
    assert torch.allclose(samples[1]["x"], expected)
    # the square moves right: the bright column's centre grows frame by frame
    cols = (samples[0]["x"][0] > 0.8).float().sum(1).argmax(-1)
    assert (cols[1:] >= cols[:-1]).all() and cols[-1] > cols[0]


def test_video_folder_gray_step_and_too_short(video_tree):
    (video_tree / "b" / "broken.mp4").unlink()
    with pytest.warns(UserWarning, match="fewer than the 13 frames"):
        ds = _video(video_tree, split="train", size=24, channels=1, frames=7, frame_step=2)
    assert len(ds) == 1 and ds.items == [(0, 0)]  # frames 0, 2, ..., 12 of the mp4; the gif is too short
    assert ds[0]["x"].shape == (1, 7, 24, 24)


def test_video_pyav_fallback_matches_torchcodec(video_tree, monkeypatch):
    import data.video as video

    (video_tree / "b" / "broken.mp4").unlink()
    mp4 = video_tree / "a" / "squares.mp4"
    with_torchcodec = read_frames(mp4, [2, 5, 9])
    monkeypatch.setattr(video, "torchcodec_available", lambda: False)
    assert video.count_frames(mp4) == 20 and video.count_frames((video_tree / "b" / "anim.gif").read_bytes()) == 7
    assert torch.equal(read_frames(mp4, [2, 5, 9]), with_torchcodec)
    ds = _video(video_tree, split="eval", size=16, channels=3, frames=4)
    assert len(ds) == 5 + 1 and ds[0]["x"].shape == (3, 4, 16, 16)


# ---------------------------------------------------------------- moving-digits


def test_moving_digits():
    train = _video("moving-digits", split="train", size=64, channels=3)
    held = _video("moving-digits", split="eval", size=64, channels=1, frames=8)
    assert len(train) == 2000 and len(held) == 200
    s = train[7]
    assert s["x"].shape == (3, 16, 64, 64) and 0 <= s["x"].min() and s["x"].max() <= 1 and s["x"].max() > 0.5
    assert torch.equal(s["x"][0], s["x"][2]) and not torch.equal(s["x"][:, 0], s["x"][:, -1])  # it moves
    assert torch.equal(_video("moving-digits", split="train", size=64, channels=3)[7]["x"], s["x"])
    assert held[3]["x"].shape == (1, 8, 64, 64)

    def digits_of(ds, n):
        out = []
        for i in range(n):
            sample = ds[i]
            parts = [tuple(map(int, d.split(":"))) for d in sample["key"].split(":", 1)[1].split("-")]
            assert sample["label"] == parts[0][1] and 1 <= len(parts) <= 2
            out += [index for index, _ in parts]
        return set(out)

    train_digits, eval_digits = digits_of(train, 40), digits_of(held, 40)
    assert train_digits <= set(digits_indices("train")) and eval_digits <= set(digits_indices("eval"))
    assert train_digits.isdisjoint(eval_digits)
    assert _video("moving-digits", split="eval", size=32, channels=1, frames=4)[0]["x"].shape == (1, 4, 32, 32)


# ---------------------------------------------------------------- webdataset


def _wav_bytes(wave, rate, fmt="WAV"):
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format=fmt)
    return buffer.getvalue()


def test_webdataset_audio_round_trip_and_truncation(tmp_path):
    import webdataset as wds

    expected = {}
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"audio-{shard:06d}.tar")) as sink:
            for i in range(3):
                key = f"s{shard}{i}"
                expected[key] = i
                fmt, ext = ("FLAC", "flac") if i == 1 else ("WAV", "wav")
                sink.write({"__key__": key, ext: _wav_bytes(_sine(0.25, 8000, 300 + 50 * i), 8000, fmt), "cls": i})
    with wds.TarWriter(str(tmp_path / "broken.tar")) as sink:
        sink.write({"__key__": "junk", "wav": b"not audio", "cls": 1})
    pattern = str(tmp_path / "audio-{000000..000001}.tar")
    samples = list(_audio(pattern, split="eval", size=3000, sample_rate=16000))
    assert {s["key"]: s["label"] for s in samples} == expected
    assert all(s["x"].shape == (1, 3000) and s["x"].abs().max() > 0.4 for s in samples)
    with pytest.warns(UserWarning, match="junk"):
        mixed = list(_audio(f"{tmp_path / 'broken.tar'},{tmp_path / 'audio-000000.tar'}", split="eval", size=3000))
    assert mixed[0]["skipped"] == [f"{tmp_path / 'broken.tar'}:junk"] and len(mixed) == 3
    bad = tmp_path / "audio-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.warns(UserWarning, match="audio-000001.tar"):
        samples = list(_audio(pattern, split="train", size=3000, shuffle_buffer=1))
    keys = {s["key"] for s in samples}
    assert {"s00", "s01", "s02"} <= keys < set(expected)
    skipped = [p for s in samples for p in s["skipped"]]
    assert skipped and all("audio-000001.tar" in p for p in skipped)


def test_webdataset_video_round_trip_and_truncation(tmp_path):
    import webdataset as wds

    mp4, gif = tmp_path / "v.mp4", tmp_path / "v.gif"
    _write_mp4(mp4, _squares(12))
    _write_gif(gif, frames=6)
    with wds.TarWriter(str(tmp_path / "video-000000.tar")) as sink:
        sink.write({"__key__": "clip0", "mp4": mp4.read_bytes(), "cls": 4})
        sink.write({"__key__": "clip1", "gif": gif.read_bytes(), "json": {"label": 2}})
        sink.write({"__key__": "short", "gif": gif.read_bytes()})  # 6 frames < 8 below: skipped
    with wds.TarWriter(str(tmp_path / "video-000001.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"more{i}", "mp4": mp4.read_bytes(), "cls": i})
    pattern = str(tmp_path / "video-{000000..000001}.tar")
    samples = list(_video(pattern, split="eval", size=16, channels=3, frames=6))
    assert [(s["key"], s["label"]) for s in samples] == [("clip0", 4), ("clip1", 2), ("short", -1),
                                                         ("more0", 0), ("more1", 1), ("more2", 2)]
    with pytest.warns(UserWarning, match="fewer than the 8"):
        eight = list(_video(pattern, split="eval", size=16, channels=1, frames=8))
    assert [s["key"] for s in eight] == ["clip0", "more0", "more1", "more2"]
    assert eight[1]["skipped"] == [f"{tmp_path / 'video-000000.tar'}:clip1", f"{tmp_path / 'video-000000.tar'}:short"]
    assert all(s["x"].shape == (1, 8, 16, 16) for s in eight)
    expected = frames_to_clip(read_frames(mp4)[:8], 16, 1, train=False)
    assert torch.allclose(eight[0]["x"], expected)  # eval: the first frames, from bytes as from the file
    bad = tmp_path / "video-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: data.rfind(b"ftyp") + 200])  # cut inside the last mp4
    with pytest.warns(UserWarning, match="video-000001.tar"):
        samples = list(_video(pattern, split="train", size=16, channels=3, frames=4, shuffle_buffer=1))
    assert {s["key"] for s in samples} == {"clip0", "clip1", "short", "more0", "more1"}
    assert any("video-000001.tar" in p for s in samples for p in s["skipped"])


# ---------------------------------------------------------------- media


def test_write_samples_audio(tmp_path):
    waves = torch.from_numpy(np.stack([_sine(0.5, 8000, f) for f in (200, 400, 800)]))[:, None]
    write_samples("audio", waves, tmp_path, sample_rate=8000)
    info = sf.info(str(tmp_path / "sample_002.wav"))
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (8000, 4000, 1, "PCM_16")
    data, _ = sf.read(tmp_path / "sample_000.wav", dtype="float32")
    assert np.abs(data - waves[0, 0].numpy()).max() < 1e-3
    assert np.load(tmp_path / "samples.npy").shape == (3, 1, 4000)
    with Image.open(tmp_path / "spectrograms.png") as img:
        assert img.mode == "RGB" and img.width > 256


def test_write_samples_video_and_files(tmp_path):
    clips = torch.rand(2, 3, 6, 32, 32)
    write_samples("video", clips, tmp_path)
    assert np.load(tmp_path / "samples.npy").shape == (2, 6, 3, 32, 32)
    assert np.allclose(np.load(tmp_path / "samples.npy")[1, 4], clips[1, :, 4].numpy())
    assert read_frames(tmp_path / "sample_001.mp4").shape == (6, 3, 32, 32)
    with Image.open(tmp_path / "frames.png") as img:
        assert img.size == (6 * 34 + 2, 2 * 34 + 2)
    gray = torch.rand(1, 5, 17, 23)  # odd sizes: padded to even for H.264
    write_output("video", gray, tmp_path / "out.mp4")
    assert read_frames(tmp_path / "out.mp4").shape == (5, 3, 18, 24)
    x = read_input("video", tmp_path / "out.mp4", 1, (1, 4, 4), size=12)
    assert x.shape == (1, 5, 12, 16)
    write_output("video", gray, tmp_path / "out.gif")
    back = read_input("video", tmp_path / "out.gif", 1, (1, 1, 1))
    assert back.shape == (1, 5, 17, 23) and (back - gray).abs().max() < 0.01
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read video"):
        read_input("video", tmp_path / "bad.mp4", 3, (1, 1, 1))
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        write_output("video", gray, tmp_path / "out.avi")


def test_audio_files_round_trip(tmp_path):
    wave = torch.from_numpy(_sine(0.5, 16000))[None]
    write_output("audio", wave, tmp_path / "a.flac", 16000)
    back = read_input("audio", tmp_path / "a.flac", 1, (64,), sample_rate=16000)
    assert back.shape == (1, 8000 // 64 * 64) and (back - wave).abs().max() < 1e-3
    back = read_input("audio", tmp_path / "a.flac", 1, (48,), sample_rate=16000)
    assert back.shape == (1, 7968) and (back - wave[:, 16:-16]).abs().max() < 1e-3
    assert read_input("audio", tmp_path / "a.flac", 1, (4,), size=10000, sample_rate=8000).shape == (1, 10000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF junk")
    with pytest.raises(ValueError, match="cannot read audio"):
        read_input("audio", tmp_path / "bad.wav", 1, (4,))
    with pytest.raises(ValueError, match=r"\.wav or \.flac"):
        write_output("audio", wave, tmp_path / "a.mp3")


def test_save_comparison_audio_and_video(tmp_path):
    waves = torch.from_numpy(np.stack([_sine(0.5, 16000, f) for f in (300, 600)]))[:, None]
    save_comparison(waves, waves * 0.5, tmp_path / "audio.png", modality="audio")
    with Image.open(tmp_path / "audio.png") as img:
        assert img.width > 256 and img.height > 2 * 128
    clips = torch.rand(3, 1, 4, 16, 16)
    save_comparison(clips, clips.flip(-1), tmp_path / "video.png", modality="video")
    with Image.open(tmp_path / "video.png") as img:
        assert img.size == (4 * 18 + 2, 6 * 18 + 2)  # a row per original and per reconstruction
    save_comparison(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), tmp_path / "image.png")  # image unchanged
    assert (tmp_path / "image.png").is_file()


# ---------------------------------------------------------------- losses


def test_stft_loss_and_mel_distance():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4096).clamp(-1, 1) * 0.5
    loss = MultiResolutionSTFTLoss()
    assert loss(x, x).item() == 0.0 and loss.resolutions(4096) == [512, 1024, 2048]
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_()
    value = loss(y, x)
    value.backward()
    assert value.item() > 0 and value.dtype == torch.float32
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(y.bfloat16(), x).dtype == torch.float32
    short = torch.randn(2, 300)
    assert loss.resolutions(300) == [256] and loss(short, short * 0.5).item() > 0
    d = mel_distance(x, y.detach(), 16000)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.equal(mel_distance(x, x, 16000), torch.zeros(3))
