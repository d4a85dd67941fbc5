"""Codebook formats, bad codebooks, default locations and the extraction command."""

import pickle
import sys
import types

import numpy as np
import pytest
import torch

from cocoinr_nerfstudio.codebook import (
    CODEBOOK_FILENAME,
    CodebookError,
    load_codebook,
    locate_codebook,
    random_codebook,
)
from cocoinr_nerfstudio.scripts.extract_codebook import ExtractCodebook

CODEBOOK = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7.0


def _save_lightning_style(path):
    """A taming checkpoint: state_dict plus pickled objects of a package we do not have installed."""
    module = types.ModuleType("pytorch_lightning_fake")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "x"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    sys.modules[module.__name__] = module
    try:
        torch.save(
            {
                "state_dict": {"quantize.embedding.weight": CODEBOOK, "encoder.conv_in.weight": torch.ones(2, 2)},
                "callbacks": {"ModelCheckpoint": ModelCheckpoint()},
                "global_step": np.int64(123),
            },
            path,
        )
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize(
    "name, save",
    [
        ("taming_full.ckpt", _save_lightning_style),
        ("extracted.ckpt", lambda p: torch.save({"state_dict": {"quantize.embedding.weight": CODEBOOK}}, p)),
        ("tensor.pt", lambda p: torch.save(CODEBOOK, p)),
        ("dict.pth", lambda p: torch.save({"anything": CODEBOOK}, p)),
        ("flat_key.pth", lambda p: torch.save({"quantize.embedding.weight": CODEBOOK, "other": 3}, p)),
        ("array.npy", lambda p: np.save(p, CODEBOOK.numpy())),
        ("float64.npy", lambda p: np.save(p, CODEBOOK.numpy().astype(np.float64))),
    ],
)
def test_supported_formats(tmp_path, name, save):
    path = tmp_path / name
    save(path)
    loaded = load_codebook(path)
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, CODEBOOK)


@pytest.mark.parametrize(
    "name, save, message",
    [
        ("rank1.pt", lambda p: torch.save(torch.ones(5), p), "must be 2-D"),
        ("rank3.npy", lambda p: np.save(p, np.ones((2, 3, 4))), "found shape (2, 3, 4)"),
        ("empty.pt", lambda p: torch.save(torch.ones(0, 256), p), "empty"),
        ("nan.pt", lambda p: torch.save(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), p), "1 NaN/Inf"),
        ("inf.npy", lambda p: np.save(p, np.array([[np.inf, 1.0]])), "NaN/Inf"),
        ("two.pth", lambda p: torch.save({"a": torch.ones(2, 2), "b": torch.ones(2, 2)}, p), "keys ['a', 'b']"),
        ("strings.pth", lambda p: torch.save({"note": "hello"}, p), "keys ['note']"),
        ("garbage.ckpt", lambda p: p.write_bytes(b"not a checkpoint at all"), "Could not read"),
        ("truncated.pt", lambda p: p.write_bytes(_truncated()), "Could not read"),
        ("bools.pt", lambda p: torch.save(torch.ones(2, 2, dtype=torch.bool), p), "must hold numbers"),
    ],
)
def test_bad_codebooks_name_the_file_and_the_problem(tmp_path, name, save, message):
    path = tmp_path / name
    save(path)
    with pytest.raises(CodebookError) as error:
        load_codebook(path)
    assert str(path) in str(error.value) and message in str(error.value)


def _truncated() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(CODEBOOK, buffer)
    return buffer.getvalue()[:100]


def test_untrusted_classes_are_never_imported_or_run(tmp_path):
    """A checkpoint that would run code on a plain unpickle loads inertly."""

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"quantize.embedding.weight": CODEBOOK}, "payload": Evil()}, path, pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    torch.testing.assert_close(load_codebook(path), CODEBOOK)


def test_missing_file(tmp_path):
    with pytest.raises(CodebookError, match="does not exist"):
        locate_codebook(tmp_path / "nope.ckpt")


def test_default_locations_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(CodebookError) as error:
        locate_codebook(None)
    message = str(error.value)
    assert "ckpts/" + CODEBOOK_FILENAME in message and "cocoinr-extract-codebook" in message
    assert "codebook-source random" in message

    cached = tmp_path / "cache" / "cocoinr" / CODEBOOK_FILENAME
    cached.parent.mkdir(parents=True)
    torch.save(CODEBOOK, cached)
    assert locate_codebook(None) == cached
    local = tmp_path / "ckpts" / CODEBOOK_FILENAME
    local.parent.mkdir()
    torch.save(CODEBOOK, local)
    assert locate_codebook(None) == local  # the original project's location wins


def test_random_codebook_is_reproducible():
    torch.testing.assert_close(random_codebook((5, 3), seed=1), random_codebook((5, 3), seed=1))
    assert not torch.equal(random_codebook((5, 3), seed=1), random_codebook((5, 3), seed=2))


def test_extract_command_writes_compact_file_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "last.ckpt"
    _save_lightning_style(source)
    output = ExtractCodebook(vqgan_checkpoint=source).main()
    assert output == tmp_path / "cache" / "cocoinr" / CODEBOOK_FILENAME
    assert torch.load(output, weights_only=True)["state_dict"]["quantize.embedding.weight"].shape == (6, 4)
    before = output.read_bytes()
    with pytest.raises(CodebookError, match="already exists"):
        ExtractCodebook(vqgan_checkpoint=source).main()
    assert output.read_bytes() == before
    ExtractCodebook(vqgan_checkpoint=source, overwrite=True).main()
