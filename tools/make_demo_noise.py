"""Generate MUSAN- and RIR-like directories for trying the opt-in augmentation on the demo corpus.

    python tools/make_demo_noise.py data/demo_aug        # -> data/demo_aug/{musan/{noise,speech},rirs}/**.wav
    python train.py --config_path configs/demo.yaml --noise_dir data/demo_aug/musan --rir_dir data/demo_aug/rirs

noise/: coloured noise (one-pole low-pass of white noise, poles as the demo channels draw them);
speech/: babble, the sum of 3-5 voices from asv.synth drawn with a seed the corpus never uses;
rirs/: exponentially decaying noise tails (RT60 0.2-0.8 s) after a direct-path impulse.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from asv.conventions import SAMPLE_RATE
from asv.synth import draw_voice, synth_utterance


def main(out: Path, seed: int = 1234, num_noise: int = 10, num_babble: int = 10, num_rirs: int = 10) -> None:
    rng = np.random.default_rng(seed)
    for i in range(num_noise):
        white = rng.standard_normal(5 * SAMPLE_RATE)
        noise = signal.lfilter([1.0], [1.0, -rng.uniform(-0.5, 0.95)], white)
        write(out / "musan" / "noise" / f"noise-{i:03d}.wav", noise)
    for i in range(num_babble):
        babble = sum(synth_utterance(draw_voice(rng), 5.0, rng) for _ in range(int(rng.integers(3, 6))))
        write(out / "musan" / "speech" / f"babble-{i:03d}.wav", babble)
    for i in range(num_rirs):
        rt60 = rng.uniform(0.2, 0.8)
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
        rir[0] = 1.0
        write(out / "rirs" / f"rir-{i:03d}.wav", rir)
    print(f"wrote {num_noise} noise, {num_babble} babble and {num_rirs} RIR files under {out}")


def write(path: Path, wav: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.5 * wav / np.abs(wav).max()).astype(np.float32), SAMPLE_RATE)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo_aug"))
