"""Adapter store, manifest, fingerprint and vocabulary mask, on real files in tmp_path."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters import (
    AdapterCorrupt,
    AdapterNotFound,
    AdapterStore,
    BaseModelMismatch,
    InvalidAdapterName,
    VocabMask,
    check_name,
    fingerprint,
    parse_ref,
)
from adapters.store import MAX_VERSION

REPO = Path(__file__).resolve().parent.parent
BASE_FP = "sha256:" + "a" * 64


def fields(**overrides: object) -> dict[str, object]:
    """Manifest fields a trainer would pass: everything the store does not own."""
    return {
        "task": "rng",
        "task_config": {"low": 0, "high": 100},
        "prompt_template": "A random integer between {low} and {high}: ",
        "terminator": "<|endoftext|>",
        "terminator_id": 0,
        "min_len": 1,
        "max_len": 5,
        "mask": VocabMask(mode="allow", token_ids=[1, 2, 3]),
        "base_model": {"path": "/models/tiny", "fingerprint": BASE_FP},
        "lora": {"r": 8},
        "training": {"steps": 10},
        "metrics": {"valid_fraction": 1.0},
        **overrides,
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A saved peft adapter plus an extra plot in a subdirectory."""
    d = tmp_path / "src"
    (d / "plots").mkdir(parents=True)
    save_file({"lora_A": torch.arange(8.0).reshape(2, 4)}, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32}))
    (d / "plots" / "histogram.png").write_bytes(b"\x89PNG not really")
    return d


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def test_save_load_roundtrip(store: AdapterStore, src: Path) -> None:
    saved = store.save("rng", src, fields())
    assert saved.ref == "rng@v1"
    assert set(saved.files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "plots/histogram.png",
    }

    loaded = store.load("rng", base_fingerprint=BASE_FP)
    assert loaded.manifest == saved
    assert loaded.path == store.root / "rng" / "v1"
    weights = "adapter_model.safetensors"
    assert (loaded.path / weights).read_bytes() == (src / weights).read_bytes()
    assert loaded.manifest.mask.token_ids == [1, 2, 3]
    assert store.list() == [saved]
    assert store.names() == ["rng"]


def test_versions_increment_and_are_never_reused(store: AdapterStore, src: Path) -> None:
    for _ in range(3):
        store.save("rng", src, fields())
    store.save("other", src, fields())
    assert store.versions("rng") == [1, 2, 3]
    assert store.latest("rng") == 3
    assert store.load("rng", 2).manifest.version == 2

    store.delete("rng", 3)
    assert store.versions("rng") == [1, 2]
    assert store.save("rng", src, fields()).version == 4
    assert [m.ref for m in store.list()] == ["other@v1", "rng@v1", "rng@v2", "rng@v4"]


def test_same_job_id_saves_one_version(store: AdapterStore, src: Path) -> None:
    first = store.save("rng", src, fields(), job_id="job-1")
    assert store.save("rng", src, fields(), job_id="job-1") == first
    assert store.save("rng", src, fields(), job_id="job-2").version == 2
    assert store.versions("rng") == [1, 2]


def test_tampered_file_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    path = store.root / "rng" / "v1" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterCorrupt, match=r"rng@v1: file 'adapter_model.safetensors' has sha256"):
        store.load("rng")
    assert store.manifest("rng").version == 1  # listing does not verify checksums


def test_added_file_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    (store.root / "rng" / "v1" / "plots" / "extra.bin").write_bytes(b"x")
    with pytest.raises(AdapterCorrupt, match=r"plots/extra.bin.*not listed"):
        store.load("rng")


def test_missing_file_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    (store.root / "rng" / "v1" / "adapter_config.json").unlink()
    with pytest.raises(AdapterCorrupt, match=r"adapter_config.json.*missing"):
        store.load("rng")


def test_unreadable_manifest_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    manifest_path = store.root / "rng" / "v1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"task":', '"taks":'))
    with pytest.raises(AdapterCorrupt, match="manifest.json"):
        store.load("rng")


def test_a_changed_manifest_that_still_parses_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    manifest_path = store.root / "rng" / "v1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(BASE_FP, "sha256:" + "b" * 64))
    store.manifest("rng")  # listings still read it
    with pytest.raises(AdapterCorrupt, match="manifest.json changed since it was saved"):
        store.load("rng", base_fingerprint="sha256:" + "b" * 64)


def test_a_name_keeps_one_task(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    with pytest.raises(ValueError, match="keeps one task"):
        store.save("rng", src, fields(task="infill"))
    assert store.versions("rng") == [1] and store.task_of("rng") == "rng" and store.task_of("new") is None


def test_a_damaged_version_does_not_block_a_jobs_save(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields(), job_id="job-1")
    (store.root / "rng" / "v1" / "manifest.json").write_text("{torn")
    assert store.save("rng", src, fields(), job_id="job-2").version == 2
    assert store.save("rng", src, fields(), job_id="job-2").version == 2  # still idempotent


def test_a_damaged_version_is_listed_apart_and_hides_no_other(store: AdapterStore, src: Path) -> None:
    """`gfn adapters list` and `gfn up` read the listing: one torn manifest must not fail it."""
    for name in ("rng", "rng", "other"):
        store.save(name, src, fields())
    (store.root / "rng" / "v1" / "manifest.json").write_text("{torn")
    damaged: dict[str, str] = {}
    assert [m.ref for m in store.list(damaged)] == ["other@v1", "rng@v2"]
    assert list(damaged) == ["rng@v1"] and "manifest.json" in damaged["rng@v1"]


def test_other_base_model_is_refused(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())
    other = "sha256:" + "b" * 64
    with pytest.raises(BaseModelMismatch) as err:
        store.load("rng", base_fingerprint=other)
    assert BASE_FP in str(err.value) and other in str(err.value)


def test_another_tokenizer_is_refused_where_the_manifest_records_one(store: AdapterStore, src: Path) -> None:
    store.save("rng", src, fields())  # from before the digest: any tokenizer
    assert store.load("rng", 1, BASE_FP, base_tokenizer="sha256:" + "c" * 64).manifest.base_model.tokenizer is None
    store.save("rng", src, fields(base_model={"path": "/models/tiny", "fingerprint": BASE_FP, "tokenizer": "sha256:t"}))
    assert store.load("rng", 2, BASE_FP, base_tokenizer="sha256:t").manifest.version == 2
    with pytest.raises(BaseModelMismatch, match="another tokenizer"):
        store.load("rng", 2, BASE_FP, base_tokenizer="sha256:" + "c" * 64)


@pytest.mark.parametrize(
    "name", ["../x", "A B", "a/b", "", "a..b", ".hidden", "-x", "x\n", "x" * 65]
)
def test_invalid_names_are_refused(store: AdapterStore, src: Path, name: str) -> None:
    with pytest.raises(InvalidAdapterName):
        check_name(name)
    with pytest.raises(InvalidAdapterName):
        store.save(name, src, fields())
    with pytest.raises(InvalidAdapterName):
        store.load(name)
    assert not (store.root.parent / "x").exists()


def test_refs_name_a_version_or_none() -> None:
    assert parse_ref("rng") == ("rng", None) and parse_ref("in.fill@v12") == ("in.fill", 12)
    for ref in ("rng@v", "rng@v0", "rng@v01", "rng@vx", "rng@v²", f"rng@v{2**31}", "../x@v1", "@v1"):
        with pytest.raises(InvalidAdapterName, match="adapter"):
            parse_ref(ref)


def test_unknown_adapter_or_version(store: AdapterStore, src: Path) -> None:
    with pytest.raises(AdapterNotFound, match="no adapter named 'rng'"):
        store.load("rng")
    store.save("rng", src, fields())
    with pytest.raises(AdapterNotFound, match=r"rng@v7 not found.*\[1\]"):
        store.load("rng", 7)
    with pytest.raises(AdapterNotFound):
        store.delete("rng", 7)
    with pytest.raises(AdapterNotFound):
        store.load("rng", "1/../../x")  # type: ignore[arg-type]


def test_bad_saves_are_refused_before_writing(store: AdapterStore, src: Path) -> None:
    with pytest.raises(ValueError, match="set by the store"):
        store.save("rng", src, fields(version=3))
    (src / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        store.save("rng", src, fields())
    assert store.versions("rng") == []


def test_crash_leftovers_are_not_versions_and_are_cleaned(store: AdapterStore, src: Path) -> None:
    crashed = store.root / ".tmp" / "rng~0123abcd"
    shutil.copytree(src, crashed)
    foreign = store.root / ".tmp" / "rng.b~0123abcd"  # another name's writer: not ours to remove
    foreign.mkdir()
    assert store.versions("rng") == [] and store.list() == []

    store.save("rng", src, fields())
    assert store.versions("rng") == [1]
    assert not crashed.exists() and foreign.exists()
    shutil.copytree(src, crashed)  # a save killed after the last one: a delete cleans it too
    store.delete("rng", 1)
    assert not crashed.exists() and foreign.exists() and store.versions("rng") == []


def test_entries_no_ref_can_name_are_not_versions(store: AdapterStore, src: Path) -> None:
    """A file called v2 made `list` and every later save fail; a v2147483648 made by hand could be
    neither named nor deleted, and its refusal ended the service's store watch."""
    store.save("rng", src, fields())
    (store.root / "rng" / "v2").write_text("hi")
    (store.root / "rng" / f"v{MAX_VERSION + 1}").mkdir()
    (store.root / "rng" / ".last_version").write_text("abc")  # damaged by hand: the versions present bound it
    assert store.versions("rng") == [1] and [m.ref for m in store.list()] == ["rng@v1"]
    assert store.save("rng", src, fields()).version == 3  # past the file in v2's place
    assert store.versions("rng") == [1, 3]
    (store.root / "rng" / ".last_version").write_text(str(MAX_VERSION))
    with pytest.raises(AdapterCorrupt, match="no version is left"):
        store.save("rng", src, fields())


def test_a_lock_or_staging_path_in_the_way_is_named_and_loses_nothing(store: AdapterStore, src: Path) -> None:
    """A `.lock` that is a directory or a `.tmp` that is a file gave a traceback on save and delete."""
    store.save("rng", src, fields())
    lock = store.root / "rng" / ".lock"
    lock.unlink()
    lock.mkdir()
    for write in (lambda: store.save("rng", src, fields()), lambda: store.delete("rng", 1)):
        with pytest.raises(AdapterCorrupt, match=f"cannot use {lock} .Is a directory.: make it writable, or remove what is in the way"):
            write()
    lock.rmdir()
    shutil.rmtree(store.root / ".tmp")
    (store.root / ".tmp").write_text("")
    for write in (lambda: store.save("rng", src, fields()), lambda: store.delete("rng", 1)):
        with pytest.raises(AdapterCorrupt, match=f"cannot use {store.root / '.tmp'} "):
            write()
    assert store.versions("rng") == [1] and store.load("rng", 1).manifest.version == 1


def make_model(d: Path, weight: torch.Tensor, **config: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4, **config}))
    save_file({"embed.weight": weight}, d / "model.safetensors")
    return d


def rewrite_weights(d: Path, weight: torch.Tensor) -> None:
    """Rewrite in place with the same size; set a later mtime, as file-system clocks are coarse."""
    path = d / "model.safetensors"
    before = path.stat().st_mtime_ns
    save_file({"embed.weight": weight}, path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_fingerprint_follows_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GFN_CACHE_DIR", str(tmp_path / "cache"))
    model = make_model(tmp_path / "model", torch.ones(3, 4))
    listing = sorted(os.listdir(model))

    first = fingerprint(model)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    assert fingerprint(model) == first
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    assert sorted(os.listdir(model)) == listing  # nothing written into the model directory

    copy = make_model(tmp_path / "copy", torch.ones(3, 4))
    assert fingerprint(copy) == first  # content, not path
    (copy / "config.json").write_text(json.dumps({"hidden_size": 4, "model_type": "llama"}))
    assert fingerprint(copy) == first  # canonical JSON: key order does not matter

    rewrite_weights(model, torch.full((3, 4), 2.0))
    changed = fingerprint(model)
    assert changed != first
    monkeypatch.setenv("GFN_CACHE_DIR", str(tmp_path / "fresh-cache"))
    assert fingerprint(model) == changed  # the cached value was not stale

    make_model(model, torch.full((3, 4), 2.0), num_hidden_layers=2)
    assert fingerprint(model) != changed


def test_fingerprint_needs_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GFN_CACHE_DIR", str(tmp_path / "cache"))
    model = make_model(tmp_path / "model", torch.ones(2))
    (model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weight files"):
        fingerprint(model)


def test_vocab_mask_bias() -> None:
    p = -99.0
    assert torch.equal(VocabMask().bias(4, terminator_id=3), torch.zeros(4))

    deny = VocabMask(mode="deny", token_ids=[1, 3]).bias(5, terminator_id=3)
    assert deny.dtype == torch.float32
    assert deny.tolist() == [0, p, 0, 0, 0]  # the terminator is never masked

    allow = VocabMask(mode="allow", token_ids=[1, 2], penalty=-5.0).bias(5, terminator_id=4)
    assert allow.tolist() == [-5.0, 0, 0, -5.0, 0]

    with pytest.raises(ValueError, match="outside the vocabulary"):
        VocabMask(mode="deny", token_ids=[9]).bias(5, terminator_id=0)


def test_gfn_store_moves_the_store_for_the_command_line_and_the_service(tmp_path, src, monkeypatch):
    """Workers and `gfn train` write where GFN_STORE says, the service reads there: one store."""
    from typer.testing import CliRunner

    from adapters.home import store_root
    from gfn.cli import app
    from service.settings import Settings

    AdapterStore(tmp_path / "elsewhere").save("rng", src, fields())
    monkeypatch.setenv("GFN_STORE", str(tmp_path / "elsewhere"))
    assert store_root() == Settings().store == tmp_path / "elsewhere"
    listed = CliRunner().invoke(app, ["adapters", "list"])
    assert listed.exit_code == 0 and "rng@v1" in listed.output


def test_a_store_that_is_a_file_is_refused_at_once(tmp_path, monkeypatch):
    """By the store, and by the service's settings naming `store`, before any training or serving."""
    from pydantic import ValidationError

    from adapters.errors import StoreNotADirectory
    from service.settings import Settings

    file = tmp_path / "store"
    file.write_text("")
    with pytest.raises(StoreNotADirectory, match="is a file"):
        AdapterStore(file)
    monkeypatch.setenv("GFN_STORE", str(file))
    with pytest.raises(ValidationError, match="store"):
        Settings()


def test_an_empty_gfn_home_is_unset(tmp_path, monkeypatch):
    """`GFN_HOME=` as "." would put the store into the source tree (its `adapters/` package)."""
    from adapters.home import gfn_home

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GFN_HOME", "")
    assert gfn_home() == tmp_path / ".gfn"


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions hold: root reads a mode-000 file otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permissions cannot be made to hold")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_an_unreadable_file_or_name_is_a_damaged_version_not_a_crash(store, src):
    """A permission denied on one version's weights gave a traceback in `gfn adapters verify`, and the
    service failed to start for every adapter; on a name's directory `gfn adapters list` crashed too."""
    store.save("rng", src, fields())
    store.save("other", src, fields())
    weights = store.root / "rng" / "v1" / "adapter_model.safetensors"

    def gfn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*_unprivileged(), sys.executable, "-m", "gfn.cli", "adapters", *args,
                               "--store", str(store.root)], capture_output=True, text=True, cwd=REPO)
    weights.chmod(0)
    try:
        verified = gfn("verify")
        said = " ".join(verified.stdout.split())
        assert verified.returncode == 1 and "Traceback" not in verified.stderr, verified.stderr
        assert "damaged rng@v1" in said and "cannot be read" in said and "ok other@v1" in said, said
    finally:
        weights.chmod(0o644)
    (store.root / "rng").chmod(0)
    try:
        listed = gfn("list")
        assert listed.returncode == 0 and "other@v1" in listed.stdout and "Traceback" not in listed.stderr, listed.stderr
        verified = gfn("verify")  # exit 2 would say there is no store
        said = " ".join(verified.stdout.split())
        assert verified.returncode == 1 and "damaged rng" in said and "ok other@v1" in said, said
    finally:
        (store.root / "rng").chmod(0o755)


def test_the_command_line_shows_verifies_and_deletes_versions(store, src):
    """`gfn adapters verify` finds a byte changed in a weights file (exit 1) and names the version;
    `show` prints the manifest; `delete` takes one named version, a damaged one too, and only after
    asking; a store that is a file, or missing, is named."""
    from typer.testing import CliRunner

    from gfn.cli import app

    def gfn(*args: str, answer: str = "") -> tuple[int, str]:
        result = CliRunner().invoke(app, ["adapters", *args, "--store", str(store.root)], input=answer)
        return result.exit_code, " ".join(result.output.split())

    assert gfn("verify") == (2, f"error: no adapter store at {store.root}")  # a typo is no passed check
    for _ in range(2):
        store.save("rng", src, fields())
    assert gfn("verify") == (0, "ok rng@v1 ok rng@v2 2 versions checked, 0 damaged")
    weights = store.root / "rng" / "v2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, said = gfn("verify")
    assert code == 1 and "damaged rng@v2" in said and "adapter_model.safetensors" in said and "ok rng@v1" in said
    assert gfn("verify", "rng@v1")[0] == 0
    assert gfn("verify", "rng@v9")[0] == 2 and gfn("verify", "absent")[0] == 2 and gfn("verify", "rng@vx")[0] == 2
    code, said = gfn("show", "rng")
    assert code == 0 and json.loads(said)["version"] == 2 and json.loads(said)["task"] == "rng"
    assert gfn("delete", "rng")[0] == 2  # a bare name could mean every version: refused
    assert gfn("delete", "rng@v2", answer="n\n")[0] == 1 and store.versions("rng") == [1, 2]
    assert gfn("delete", "rng@v2", answer="y\n")[0] == 0 and store.versions("rng") == [1]
    assert gfn("delete", "rng@v1", "--yes")[0] == 0 and store.versions("rng") == []
    assert gfn("delete", "rng@v1", "--yes")[0] == 2
    store.save("rng", src, fields())
    (store.root / "rng" / "v3" / "manifest.json").write_text("{")  # a version that no longer reads
    code, said = gfn("list")  # the reason's "[type=json_invalid, ...]" was read as markup and dropped
    assert code == 0 and "damaged rng@v3" in said and "[type=json_invalid" in said, said
    code, said = gfn("delete", "rng@v3", answer="y\n")
    assert code == 0 and "delete rng@v3 (damaged: " in said and store.versions("rng") == []
    file = store.root.parent / "a-file"
    file.write_text("")
    for args in (["list"], ["verify"], ["show", "rng"], ["delete", "rng@v1", "--yes"]):
        result = CliRunner().invoke(app, ["adapters", *args, "--store", str(file)])
        assert result.exit_code == 2 and "is a file, not a directory" in " ".join(result.output.split()), args


def test_concurrent_writers_get_distinct_versions_and_none_is_lost(tmp_path, src):
    """Several workers saving one name at once: every save gets its own version, numbered without
    gaps, each intact, and a retried job (same job id) still gets back the version it saved."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_store import fields
from adapters import AdapterStore
store = AdapterStore({str(tmp_path / "store")!r})
for k in range(3):
    store.save("rng", {str(src)!r}, fields(), job_id=f"{{sys.argv[1]}}-{{k}}")
"""
    writers = [subprocess.Popen([sys.executable, "-c", code, str(p)]) for p in range(4)]
    assert [w.wait(120) for w in writers] == [0] * 4
    store = AdapterStore(tmp_path / "store")
    assert store.versions("rng") == list(range(1, 13))
    jobs = {store.load("rng", v).manifest.job_id: v for v in range(1, 13)}  # load verifies every file
    assert set(jobs) == {f"{p}-{k}" for p in range(4) for k in range(3)}
    assert store.save("rng", src, fields(), job_id="2-1").version == jobs["2-1"]


def test_a_version_directory_moved_by_hand_is_refused(store, src):
    store.save("rng", src, fields())
    os.rename(store.root / "rng" / "v1", store.root / "rng" / "v9")
    with pytest.raises(AdapterCorrupt, match="describes rng@v1"):
        store.load("rng", 9)
