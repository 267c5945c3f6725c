"""The evaluation engine end to end: cache, dev selection, AS-norm, plots, text trial lists, and a checkpoint used
through `python -m asv verify|embed` and the Python API agreeing with it."""

import json
import shutil

import numpy as np
import pytest

from tests.test_pipeline import TRAIN, run

pytestmark = pytest.mark.slow

EVAL = ["--wandb_mode", "disabled", "--num_workers", "0"]


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    """The session's tiny prepared corpus (with a dev list) and a run with checkpoints at steps 0, 2, 4."""
    data = tiny_demo[0]
    exp = tmp_path_factory.mktemp("evaluation") / "exp"
    run(
        ["train.py", *TRAIN, "--data_dir", str(data), "--exp_dir", str(exp), "--total_steps", "4"]
        + ["--save_step", "2", "--save_initial", "true"]
    )
    run(["evaluate.py", "--exp_dir", str(exp), *EVAL, "--asnorm", "true"])
    return data, exp


def test_dev_selection_and_best_on_test_are_both_reported(trained):
    _, exp = trained
    ev = exp / "evaluate"
    dev = {s: json.loads((ev / "dev" / f"step-{s}" / "results.json").read_text()) for s in (0, 2, 4)}
    test = {s: json.loads((ev / "demo_test" / f"step-{s}" / "results.json").read_text()) for s in (0, 2, 4)}
    # Step 0 (--save_initial) is scored but is no scheduled save of save_step 2: it competes in neither selection.
    assert [test[s]["scheduled"] for s in (0, 2, 4)] == [False, True, True]
    chosen = min((2, 4), key=lambda s: (dev[s]["eer"], s))
    selected = json.loads((ev / "demo_test" / "selected_result.json").read_text())
    assert selected["step"] == chosen and selected["eer"] == test[chosen]["eer"] and "dev" in selected["selection"]
    best = json.loads((ev / "demo_test" / "best_result.json").read_text())
    assert best["eer"] == min(test[s]["eer"] for s in (2, 4)) and "SUPERB" in best["selection"]
    assert best["competing_steps"] == [2, 4] and best["excluded_steps"] == [0]
    assert not (ev / "dev" / "selected_result.json").exists()
    # 4 utterances x accumulation 2 on one process: trained with 8 per update, labelled as not SUPERB's 50.
    assert test[4]["effective_batch"] == 8 and "not SUPERB's recipe" in test[4]["effective_batch_note"]


def test_asnorm_plots_and_cache_are_written(trained):
    _, exp = trained
    ev = exp / "evaluate"
    res = json.loads((ev / "demo_test" / "step-4" / "results.json").read_text())
    assert res["as_norm"]["cohort_speakers"] == 6 and 0 <= res["as_norm"]["eer"] <= 100
    scores = np.loadtxt(ev / "demo_test" / "step-4" / "scores.txt")
    assert scores.shape == (40, 3)  # score label score_asnorm
    for png in ("demo_test/det.png", "dev/det.png", "demo_test/step-4/scores_hist.png"):
        assert (ev / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    with np.load(ev / "step-4" / "embeddings.npz") as z:
        # test utterances + 2 dev speakers x 4 + the AS-norm cohort (6 speakers x 3 utterances)
        assert len(z["ids"]) == len(set(z["paths"].tolist())) == z["embeddings"].shape[0]
        assert z["embeddings"].shape[1] == 512 and np.isfinite(z["embeddings"]).all()


def test_rescoring_reuses_the_cache_and_gives_identical_scores(trained, tmp_path, monkeypatch):
    import asv.extract
    import evaluate

    _, exp = trained

    def no_embedding(*args, **kwargs):
        raise AssertionError("re-embedded although every utterance is cached")

    monkeypatch.setattr(asv.extract, "embed_all", no_embedding)
    evaluate.main(["--ckpt_dir", str(exp / "step-4"), *EVAL, "--out_dir", str(exp / "evaluate"), "--plots", "false"])
    # A changed checkpoint invalidates its cache (the fingerprint covers the weights).
    copy = tmp_path / "run" / "step-4"
    shutil.copytree(exp / "step-4", copy)
    shutil.copy(exp / "evaluate" / "step-4" / "embeddings.npz", tmp_path / "cache.npz")
    with open(copy / "config.yaml", "a") as f:
        f.write("\n# edited\n")
    (tmp_path / "run" / "evaluate" / "step-4").mkdir(parents=True)
    shutil.copy(tmp_path / "cache.npz", tmp_path / "run" / "evaluate" / "step-4" / "embeddings.npz")
    with pytest.raises(AssertionError, match="re-embedded"):
        evaluate.main(["--ckpt_dir", str(copy), *EVAL, "--plots", "false"])


def test_text_trial_list_export_and_cache_consistency(trained, tmp_path):
    data, exp = trained
    corpus = data.parent / "corpus"
    rows = (data / "trials" / "demo_test.csv").read_text().splitlines()[1:]
    text = tmp_path / "mine.txt"
    text.write_text("".join(f"{r.split(',')[4]} {r.split(',')[0]} {r.split(',')[1]}\n" for r in rows))
    out = tmp_path / "ev"
    run(
        ["evaluate.py", "--ckpt_dir", str(exp / "step-4"), *EVAL, "--trials", str(text), "--wav_root", str(corpus)]
        + ["--out_dir", str(out)]
    )
    mine = np.loadtxt(out / "mine" / "step-4" / "scores.txt")
    prepared = np.loadtxt(exp / "evaluate" / "demo_test" / "step-4" / "scores.txt")
    np.testing.assert_allclose(mine[:, :2], prepared[:, :2], atol=1e-6)  # cached (batched) vs fresh: same scores
    # The scored utterances' embeddings exported by `python -m asv embed`, their ids and relative paths as the
    # list names them, resolved against the same root as evaluate.py's (asv.lists.resolve): the ones it scored.
    ids = sorted({u for r in rows for u in r.split(",")[:2]})
    wavs = tmp_path / "wavs.txt"
    wavs.write_text("".join(f"{u} {u}\n" for u in ids))
    emb = tmp_path / "emb" / "step-4.npz"
    run(
        ["-m", "asv", "embed", "--model", str(exp / "step-4"), "--list", str(wavs), "--wav_root", str(corpus)]
        + ["--out", str(emb)]
    )
    with np.load(emb) as z, np.load(out / "step-4" / "embeddings.npz") as cached:
        assert set(z["ids"].tolist()) == {u for r in rows for u in r.split(",")[:2]}
        scored = dict(zip(cached["paths"].tolist(), cached["embeddings"], strict=True))
        assert set(z["paths"].tolist()) == set(scored)
        for p, e in zip(z["paths"].tolist(), z["embeddings"], strict=True):
            np.testing.assert_allclose(e, scored[p], rtol=1e-4, atol=1e-5)

    bad = tmp_path / "bad.txt"
    bad.write_text("1 a.wav b.wav\n2 a.wav b.wav\n")
    fail = run(["evaluate.py", "--ckpt_dir", str(exp / "step-4"), *EVAL, "--trials", str(bad)], check=False)
    assert fail.returncode != 0 and f"{bad}:2" in fail.stderr


def test_pair_cli_and_python_api_agree(trained):
    import asv

    data, exp = trained
    rows = [r.split(",") for r in (data / "trials" / "demo_test.csv").read_text().splitlines()[1:3]]
    a, b = rows[0][2], rows[0][3]
    out = run(["-m", "asv", "verify", "--model", str(exp / "step-4"), a, b])
    result = asv.verify(a, b, exp / "step-4")
    dev = json.loads((exp / "evaluate" / "dev" / "step-4" / "results.json").read_text())
    assert result["threshold"] == dev["eer_threshold"] and result["same_speaker"] == (
        result["score"] >= dev["eer_threshold"]
    )
    assert f"score {result['score']:.4f} (cosine" in out.stdout
    assert f"(threshold {dev['eer_threshold']:.4f}: dev EER threshold" in out.stdout
    emb = asv.embed([a, b, rows[1][2]], exp / "step-4")
    cached = np.load(exp / "evaluate" / "step-4" / "embeddings.npz")
    np.testing.assert_allclose(emb[0], cached["embeddings"][list(cached["paths"]).index(a)], rtol=1e-4, atol=1e-5)


def test_checkpoints_of_one_frozen_upstream_share_its_forward(trained, monkeypatch):
    # evaluate.py embeds a run's checkpoints together: the upstream runs once per batch for all of them, and
    # each checkpoint's embeddings are the ones it gets alone (the same hidden states through the same weights).
    import asv.extract
    from asv.extract import Embedder, audio_lengths, embed_cached, embed_checkpoints
    from asv.manifest import read_trials_csv, unique_utterances

    data, exp = trained
    items = unique_utterances(read_trials_csv(data / "trials" / "demo_test.csv"))
    lengths = audio_lengths([p for _, p in items])
    calls = []
    hidden_states = asv.extract.ModelEmbedder.hidden_states
    monkeypatch.setattr(
        asv.extract.ModelEmbedder, "hidden_states", lambda self, *a: calls.append(1) or hidden_states(self, *a)
    )
    cache: dict = {}
    embedders = [Embedder(exp / f"step-{s}", "cpu", cache) for s in (2, 4)]
    assert embedders[0].upstream is embedders[1].upstream
    joint = embed_checkpoints(embedders, items, lengths, cache_files=[None, None], effects=False, max_frames=100_000)
    together = len(calls)
    alone = [embed_cached(e, items, lengths, cache_file=None, effects=False, max_frames=100_000) for e in embedders]
    assert len(calls) == 3 * together and together > 1  # one pass for both, then one pass each
    for j, a in zip(joint, alone, strict=True):
        assert j.keys() == a.keys() == {p for _, p in items}
        for p in a:
            np.testing.assert_array_equal(j[p], a[p])
    assert not np.array_equal(joint[0][items[0][1]], joint[1][items[0][1]])  # two different checkpoints
