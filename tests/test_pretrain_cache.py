"""The pretraining cache: damaged entries are detected, reported and rebuilt (never loaded), concurrent
jobs for one key train it once, and ``fairsweep cache list|clear`` manage it."""
from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import torch

from trainables.pretrain import run_pretrain_job
from trainables.pretrain_cache import META, WEIGHTS, CacheError, PretrainCache
from tests.helpers import run_cli

DATA = {"n_source": 64, "n_finetune": 8, "n_val": 4, "n_test": 8, "image_size": 32, "seed": 0}


def _job(key: str = "k-supervised", epochs: int = 1, n_source: int = 64) -> dict:
    hp = {"epochs": epochs, "batch_size": 32, "lr": 0.05, "weight_decay": 0.0, "momentum": 0.9, "seed": 0, "options": {}}
    return {"key": key, "backbone": "test_resnet", "paradigm": "supervised", "dataset": "synthetic_images",
            "dataset_options": {**DATA, "n_source": n_source}, "hparams": hp}


@pytest.fixture()
def built(tmp_path):
    root = tmp_path / "cache"
    out = run_pretrain_job(_job(), str(root))
    return PretrainCache(root), out


def test_a_fresh_entry_is_intact_and_reused(built):
    cache, out = built
    assert not out.reused and not out.rebuilt_damaged and cache.status(out.key) == "ok"
    again = run_pretrain_job(_job(), str(cache.root))
    assert again.reused and again.meta["created"] == out.meta["created"]
    assert cache.meta(out.key)["sha256"] == out.meta["sha256"]
    assert not [p for p in cache.root.iterdir() if p.name.startswith((".tmp", ".discard"))]


def _truncate_weights(entry):
    data = (entry / WEIGHTS).read_bytes()
    (entry / WEIGHTS).write_bytes(data[: len(data) // 2])


def _flip_a_weight_byte(entry):
    data = bytearray((entry / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (entry / WEIGHTS).write_bytes(bytes(data))


def _edit_meta_field(entry):
    meta = json.loads((entry / META).read_text())
    meta["paradigm"] = "biased"  # the weights still match their checksum; the description does not
    (entry / META).write_text(json.dumps(meta))


def _edit_meta_checksum(entry):
    meta = json.loads((entry / META).read_text())
    meta["sha256"] = "0" * 64
    (entry / META).write_text(json.dumps(meta))


def _break_meta_json(entry):
    (entry / META).write_text((entry / META).read_text()[:-20])


def _remove_weights(entry):
    (entry / WEIGHTS).unlink()


def _remove_meta(entry):
    (entry / META).unlink()


DAMAGE = [_truncate_weights, _flip_a_weight_byte, _edit_meta_field, _edit_meta_checksum, _break_meta_json,
          _remove_weights, _remove_meta]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.lstrip("_") for d in DAMAGE])
def test_damaged_entry_is_detected_never_loaded_and_rebuilt(built, damage, caplog):
    cache, out = built
    damage(cache.entry(out.key))
    assert cache.status(out.key) == "damaged"
    with pytest.raises(CacheError, match="damaged"):
        cache.load(out.key)
    listed = {e["key"]: e["status"] for e in cache.entries()}
    assert listed == {out.key: "damaged"}
    with caplog.at_level("WARNING", logger="trainables.pretrain"):
        rebuilt = run_pretrain_job(_job(), str(cache.root))
    assert rebuilt.rebuilt_damaged and not rebuilt.reused
    assert rebuilt.meta["rebuilt_damaged"] is True
    assert any("damaged" in r.message and out.key in r.message for r in caplog.records)
    assert cache.status(out.key) == "ok"
    state = cache.load(out.key)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "fc.weight" not in state
    assert not [p for p in cache.root.iterdir() if p.name.startswith((".tmp", ".discard"))]


def test_load_of_a_missing_entry_raises(tmp_path):
    with pytest.raises(CacheError, match="missing"):
        PretrainCache(tmp_path).load("nope")


def test_leftovers_of_a_killed_writer_are_swept(tmp_path):
    root = tmp_path / "cache"
    stale = root / ".tmp-k-supervised-deadbeef"
    stale.mkdir(parents=True)
    (stale / WEIGHTS).write_bytes(b"half")
    out = run_pretrain_job(_job(), str(root))
    assert not stale.exists() and PretrainCache(root).status(out.key) == "ok"
    assert [e["key"] for e in PretrainCache(root).entries()] == [out.key]


# ------------------------------------------------------------------------------- concurrency


def _race(root: str, barrier, results) -> None:
    """One contender: import everything first, then start together with the others."""
    from trainables.pretrain import run_pretrain_job as run

    barrier.wait(timeout=120)
    out = run(_job(epochs=2, n_source=256), root)
    results.put((out.reused, out.meta["created"], out.meta["sha256"]))


def test_concurrent_jobs_for_one_key_train_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "cache"), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=240) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(reused for reused, _, _ in outcomes) == [False, True, True]  # one trained, two reused
    assert len({(created, sha) for _, created, sha in outcomes}) == 1  # all see the one entry it wrote
    cache = PretrainCache(tmp_path / "cache")
    assert [(e["key"], e["status"]) for e in cache.entries()] == [("k-supervised", "ok")]


# ------------------------------------------------------------------------------- the CLI


def test_cli_cache_list_and_clear(tmp_path):
    root = tmp_path / "cache"
    cache = PretrainCache(root)
    tiny = {"w": torch.zeros(4)}
    cache.write("aaaa", tiny, {"backbone": "test_resnet", "paradigm": "supervised", "created": "2024-01-01T00:00:00"})
    cache.write("bbbb", tiny, {"backbone": "test_vit", "paradigm": "mae", "created": "2024-01-02T00:00:00"})
    cache.write("cccc", tiny, {"backbone": "test_convnext", "paradigm": "biased", "created": "2024-01-03T00:00:00"})
    _truncate_weights(cache.entry("cccc"))

    out = run_cli("cache", "list", "--cache-dir", str(root), cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"3 entries in {root}" in out.stdout
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert set(lines) == {"aaaa", "bbbb", "cccc"}
    assert "ok" in lines["aaaa"] and "test_resnet" in lines["aaaa"] and "supervised" in lines["aaaa"]
    assert "mae" in lines["bbbb"] and "damaged" in lines["cccc"]

    out = run_cli("cache", "clear", "--cache-dir", str(root), "--key", "bbbb", cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "removed 1 entries" in out.stdout
    assert [e["key"] for e in cache.entries()] == ["aaaa", "cccc"]

    out = run_cli("cache", "clear", "--cache-dir", str(root), "--yes", cwd=tmp_path, timeout=120)  # every entry: confirmed
    assert out.returncode == 0 and "removed 2 entries" in out.stdout
    assert cache.entries() == [] and not [p for p in root.iterdir() if p.name != ".locks"]


def test_cli_cache_defaults_to_the_storage_path(tmp_path):
    storage = tmp_path / "results"
    PretrainCache(storage / "_pretrain_cache").write("dddd", {"w": torch.ones(2)}, {"backbone": "b", "paradigm": "p"})
    out = run_cli("cache", "list", "--storage", str(storage), cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "1 entries" in out.stdout and "dddd" in out.stdout


def test_an_entry_trained_in_another_precision_is_rebuilt_not_reused(built, caplog):
    """A base a GPU trained before resources.precision existed ran under bf16 autocast and its key names no
    precision, the key an fp32 or CPU job has now: it is rebuilt, never handed to the fp32 job."""
    from safetensors.torch import load_file

    cache, out = built
    assert out.meta["precision"] == "fp32" and out.meta["device"] == "cpu"
    weights = load_file(str(cache.entry(out.key) / WEIGHTS))
    old_gpu = {k: v for k, v in cache.meta(out.key).items() if k not in ("precision", "sha256", "meta_sha256", "key")}
    cache.write(out.key, weights, {**old_gpu, "device": "cuda:0", "created": "before"})
    assert cache.status(out.key) == "ok"
    with caplog.at_level("WARNING", logger="trainables.pretrain"):
        again = run_pretrain_job(_job(), str(cache.root))
    assert not again.reused and again.meta["precision"] == "fp32" and again.meta["created"] != "before"
    assert "was trained in bf16, not fp32; rebuilding it" in caplog.text
    assert run_pretrain_job(_job(), str(cache.root)).reused  # and the rebuilt one is reused
