"""score_models over banks given as tensors, dicts and files; the table and its exports; the
progress bar; sharding across two torch.distributed CPU ranks (gloo); and the CLI."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import pykernels.selection as S
from pykernels import cli
from pykernels.selection.bank import ScoreTable

pytest.importorskip("scipy")


def make_bank(n_models=5, N=80, D=24, C=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    y[:C] = np.arange(C)
    feats = {
        f"model_{i}": (rng.standard_normal((N, D)) + np.eye(C, D)[y] * i).astype(np.float32) for i in range(n_models)
    }
    probs = {name: rng.dirichlet(np.ones(6), size=N) for name in feats}
    return feats, probs, y


def test_scores_equal_direct_calls_and_keep_bank_order():
    feats, probs, y = make_bank()
    table = S.score_models(
        feats, y, methods=("parc", "logme", "leep"), source_probs=probs, pca_dim=8, batch_size=2, progress=False
    )
    assert table.names == list(feats) and table.methods == ["parc", "logme", "leep"]
    stacked = np.stack(list(feats.values()))
    np.testing.assert_allclose(table["parc"], S.parc(stacked, y, pca_dim=8).numpy(), atol=1e-12)
    np.testing.assert_allclose(table["logme"], S.logme(stacked, y).numpy(), atol=1e-12)
    np.testing.assert_allclose(table["leep"], S.leep(np.stack(list(probs.values())), y).numpy(), atol=1e-12)
    # Stronger class signal in later models: PARC ranks them first.
    np.testing.assert_array_equal(table.ranks("parc"), [5, 4, 3, 2, 1])
    assert table.order() == [4, 3, 2, 1, 0]
    assert set(table.seconds) == {"parc", "logme", "leep"}


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_folder_of_files(tmp_path, suffix):
    feats, probs, y = make_bank(n_models=3)
    for name, f in feats.items():
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".npy":
            np.save(path, f)
        elif suffix == ".npz":
            np.savez(path, features=f, probs=probs[name])
        elif suffix == ".pt":
            torch.save({"features": torch.from_numpy(f), "probs": torch.from_numpy(probs[name])}, path)
        else:
            from safetensors.torch import save_file

            save_file({"features": torch.from_numpy(f), "probs": torch.from_numpy(probs[name])}, str(path))
    (tmp_path / "notes.txt").write_text("not a model")
    methods = ("parc", "nce") if suffix != ".npy" else ("parc",)
    table = S.score_models(tmp_path, y, methods=methods, pca_dim=8, progress=False)
    expect = S.score_models(feats, y, methods=methods, source_probs=probs, pca_dim=8, progress=False)
    assert table.names == expect.names
    for m in methods:
        np.testing.assert_allclose(table[m], expect[m], atol=1e-12)


def test_table_exports(tmp_path):
    feats, _, y = make_bank(n_models=3)
    table = S.score_models(feats, y, methods=("parc", "transrate"), pca_dim=8, progress=False)
    csv_text = table.to_csv(tmp_path / "t.csv")
    lines = csv_text.strip().splitlines()
    assert lines[0] == "model,parc,parc_rank,transrate,transrate_rank"
    assert lines[1].startswith("model_2,") and len(lines) == 4
    assert (tmp_path / "t.csv").read_text() == csv_text
    data = json.loads(table.to_json(tmp_path / "t.json"))
    assert data["methods"] == ["parc", "transrate"] and data["models"][0]["model"] == "model_2"
    assert data["models"][0]["parc"] == pytest.approx(table["parc"][2])
    text = str(table)
    assert text.splitlines()[0].split() == ["rank", "model", "parc", "transrate"]
    assert text.splitlines()[2].split()[:2] == ["1", "model_2"]
    assert "ranked by parc" in text


def test_the_printed_table_shows_scores_that_differ_as_different():
    """Scores that agree to 4 digits (H-scores of similar models) get the digits that tell them apart."""
    table = ScoreTable(["a", "b", "c"], {"hscore": np.array([3.00012, 3.00017, np.nan])})
    shown = [line.split()[2] for line in str(table).splitlines()[2:5]]
    assert shown == ["3.0002", "3.0001", "nan"]


def test_nan_scores_rank_last_and_export_as_null():
    table = ScoreTable(["a", "b", "c"], {"parc": np.array([1.0, np.nan, 3.0])})
    assert np.isnan(table.ranks("parc")[1]) and table.order() == [2, 0, 1]
    assert json.loads(table.to_json())["models"][2] == {"model": "b", "parc": None, "parc_rank": None}


def test_progress_bar(capsys):
    feats, _, y = make_bank(n_models=3)
    S.score_models(feats, y, pca_dim=8, batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert "scoring models" in err and "3/3" in err and err.endswith("\n")


def test_streams_files_batch_by_batch(tmp_path, monkeypatch):
    """Only batch_size models are held at once: count live loads."""
    feats, _, y = make_bank(n_models=6)
    for name, f in feats.items():
        np.save(tmp_path / f"{name}.npy", f)
    from pykernels.selection import bank as bank_module

    loads = []
    original = bank_module.load_entry

    def counting(entry, name="model"):
        loads.append(name)
        return original(entry, name)

    monkeypatch.setattr(bank_module, "load_entry", counting)
    calls = []
    original_parc = bank_module.METHODS["parc"]
    monkeypatch.setitem(
        bank_module.METHODS,
        "parc",
        bank_module.Method("parc", "features", lambda x, y_, o: (calls.append(len(x)), original_parc.fn(x, y_, o))[1]),
    )
    S.score_models(tmp_path, y, pca_dim=8, batch_size=4, progress=False)
    assert calls == [4, 2] and len(loads) == 6


def test_all_methods():
    feats, probs, y = make_bank(n_models=2, D=40)
    table = S.score_models(feats, y, methods="all", source_probs=probs, pca_dim=8, progress=False)
    assert table.methods == list(S.METHODS)
    assert all(np.isfinite(table[m]).all() for m in table.methods)
    no_probs = S.score_models(feats, y, methods="all", pca_dim=8, progress=False)
    assert "leep" not in no_probs.methods and "parc" in no_probs.methods


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(methods=("parc", "magic")), ValueError, r"unknown method\(s\) \['magic'\]"),
        (dict(methods=("leep",)), ValueError, "leep needs source-model probabilities"),
        (dict(bank="/no/such/folder"), FileNotFoundError, "is not a folder"),
        (dict(bank=42), TypeError, "bank must be a mapping"),
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
        (dict(distributed=True), RuntimeError, "torch.distributed is not initialized"),
    ],
)
def test_bad_input(kwargs, exc, pattern):
    feats, _, y = make_bank(n_models=2)
    args = dict(bank=feats, labels=y, pca_dim=8, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        S.score_models(**args)


def _rank_worker(rank, world, init_file, folder, y, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        table = S.score_models(folder, y, methods=("parc", "gbc"), pca_dim=8, batch_size=2, progress=False)
        torch.save({"names": table.names, "parc": table["parc"], "gbc": table["gbc"]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_across_two_gloo_ranks_gives_one_table(tmp_path):
    feats, _, y = make_bank(n_models=5)
    for name, f in feats.items():
        np.save(tmp_path / f"{name}.npy", f)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), y, str(tmp_path / "out")), nprocs=2)
    expect = S.score_models(tmp_path, y, methods=("parc", "gbc"), pca_dim=8, progress=False)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got["names"] == expect.names
        np.testing.assert_allclose(got["parc"], expect["parc"], atol=1e-12)
        np.testing.assert_allclose(got["gbc"], expect["gbc"], atol=1e-12)


def test_cli_select_prints_the_ranked_table(tmp_path, capsys):
    feats, _, y = make_bank(n_models=3)
    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    for name, f in feats.items():
        np.save(bank_dir / f"{name}.npy", f)
    np.save(tmp_path / "y.npy", y)
    code = cli.main(
        [
            "select",
            "--bank",
            str(bank_dir),
            "--labels",
            str(tmp_path / "y.npy"),
            "--methods",
            "parc,logme",
            "--pca-dim",
            "8",
            "--csv",
            str(tmp_path / "out.csv"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "model", "parc", "logme"] and lines[2].split()[:2] == ["1", "model_2"]
    assert os.path.exists(tmp_path / "out.csv")
    with pytest.raises(SystemExit):
        cli.main(["select", "--bank", str(bank_dir)])  # --labels missing
