"""s3prl's conventions, each written once: the sample rate, the shortest input S3PRLUpstream models as is, and
the number of frames it gives an utterance. Every module that needs one of them imports it from here; the values
are checked against s3prl 0.4.18's own (tests/test_conventions.py). This module imports nothing, so settings,
data and the upstream code can all use it."""

from __future__ import annotations

# Audio everywhere in the recipe: 16 kHz mono (s3prl.nn.upstream.SAMPLE_RATE; VoxCeleb's own rate).
SAMPLE_RATE = 16000

# S3PRLUpstream zero-extends a batch whose longest item is shorter than MIN_SECOND = 0.05 s of audio
# (s3prl.nn.upstream.MIN_SECOND * SAMPLE_RATE samples) before its expert sees it.
MIN_SAMPLES = 800


def num_frames(num_samples, stride: int):
    """The frames S3PRLUpstream gives an utterance of `num_samples` samples at `stride` samples per frame:
    ceil(num_samples / stride), the model's own frames first, its last one repeated past them. An int, a
    torch.export symbolic size or a tensor of lengths in, the same kind out (`//` floors on each)."""
    return (num_samples - 1) // stride + 1


# Utterances per optimizer update in SuperbASV's recipe: batch_size 10 x gradient_accumulate 5 on one device.
SUPERB_EFFECTIVE_BATCH = 50
