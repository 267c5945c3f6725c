"""An embedding must not depend on what it is batched with: batched == batch-size-1 through the whole model."""

import gc
import types

import numpy as np
import pytest
import soundfile as sf
import torch

from asv.audio import read_crop
from asv.config import LossConfig, ModelConfig
from asv.datasets import TrainDataset, length_buckets
from asv.manifest import Utterance
from asv.models import build_speaker_model
from asv.upstream import build_upstream, upstream_forward


def test_length_buckets_respect_the_budget_and_cover_everything():
    lengths = [5, 1, 9, 3, 3, 20, 7]
    batches = length_buckets(lengths, max_frames=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12
    assert [5] in batches  # longer than the budget: alone


@pytest.mark.numerics
def test_batched_embeddings_equal_single_utterance_embeddings():
    torch.manual_seed(0)
    upstream = build_upstream("fbank")
    model = build_speaker_model(ModelConfig(), LossConfig(), upstream, num_classes=4).eval()
    rng = np.random.default_rng(0)
    # 1 s to 20 s of noise with a slowly varying spectrum, so frames differ.
    wavs = [
        torch.from_numpy(np.convolve(rng.standard_normal(int(s * 16000)), rng.standard_normal(32), "same")).float()
        * 0.1
        for s in (1.0, 2.3, 4.7, 9.1, 13.0, 20.0)
    ]
    with torch.no_grad():
        single = torch.stack(
            [model.embed(*upstream_forward(upstream, w[None], torch.tensor([len(w)])))[0] for w in wavs]
        )
        lens = torch.tensor([len(w) for w in wavs])
        batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
        batched = model.embed(*upstream_forward(upstream, batch, lens))
    cos = torch.nn.functional.cosine_similarity(single, batched, dim=1)
    assert cos.min() >= 0.9999, cos


def training_rows(tmp_path, n: int):
    """n utterances over 3 real 1 s files (one with a non-ASCII path), their VAD intervals and speakers."""
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{name}.wav" for name in ("a", "b", "Zoë ünï")]
    for p in paths:
        sf.write(str(p), 0.1 * rng.standard_normal(16000).astype(np.float32), 16000, subtype="PCM_16")
    spans = [[[0, 4000], [6000, 12000], [13000, 16000]], [[100, 16000]], [(2000, 2500), (3000, 9000)]]
    utts = [Utterance(f"spk{k % 4}/vid/{k:05d}é.wav", str(paths[k % 3]), f"spk{k % 4}", 16000) for k in range(n)]
    intervals = {u.id: spans[k % 3] for k, u in enumerate(utts)}
    return utts, {f"spk{k}": k for k in range(4)}, intervals


def test_training_rows_read_back_as_given_and_crop_as_read_crop_does(tmp_path):
    utts, speakers, intervals = training_rows(tmp_path, 12)
    dataset = TrainDataset(utts, speakers, intervals, gain_db=-3.0, max_secs=0.4, seed=7)
    assert list(dataset.utterances) == utts and dataset.utterances[-1] == utts[-1]
    assert dataset.utterances[2:9:3] == utts[2:9:3]
    with pytest.raises(IndexError):
        dataset.utterances[len(utts)]
    for epoch in (0, 3):
        for i, u in enumerate(utts):
            wav, label = dataset[(epoch, i)]
            rng = np.random.default_rng([7, epoch, i])  # the crop stream of item i in this epoch
            assert np.array_equal(wav.numpy(), read_crop(u.wav_path, intervals[u.id], 6400, rng, -3.0))
            assert type(label) is int and label == speakers[u.spk]


def test_training_rows_are_not_python_objects_per_row(tmp_path):
    """Forked DataLoader workers copy every page of per-row Python objects they read (a read writes the reference
    count): ~1 GB per worker on VoxCeleb2-dev (bench/scale.py). The dataset must hold its rows in a fixed number
    of objects, whatever their count."""
    utts, speakers, intervals = training_rows(tmp_path, 3000)
    dataset = TrainDataset(utts, speakers, intervals, gain_db=-3.0, max_secs=0.4, seed=7)
    seen, todo = set(), list(vars(dataset).values())
    while todo:  # everything the dataset's attributes reach, short of classes, functions and modules
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type | types.FunctionType | types.ModuleType):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    assert len(seen) < 200, len(seen)
