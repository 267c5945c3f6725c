#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels bench/gpu_check.sh installs on the GPU machine: what its image
# (/work/.library/device/KINDS.md: Python 3.12, torch 2.11+cu130, torchaudio, accelerate, transformers, pandas,
# numba, tensorboard, scipy, scikit-learn, ...) lacks for our code and s3prl's SuperbASV runner. Python 3.12,
# manylinux x86_64, no dependencies resolved by pip: every wheel is named here, and a check at the end lists any
# requirement that is neither carried nor on the image. Run here (PyPI reachable), then call the device with
# carry [".whl"]: the whole working tree that travels must stay under 64 MiB.
#
# Not carried: wandb (20 MB plus OpenTelemetry and pydantic; the check runs with --wandb_mode disabled and
# never imports it); sed_eval and dcase_util (s3prl.problem imports them for HEAR scoring only, which
# SuperbASV never calls: bench/s3prl_shim.py stands in for them where they are missing, and dcase_util
# would need libmagic and pkg_resources there); setuptools<81 (only dcase_util needed its pkg_resources).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
# Pinned to the versions .venv / .venv-bench run (requirements.txt, bench/requirements.txt).
BINARY=(
  simple-parsing==0.1.9 docstring-parser==0.18.0       # our configs
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12         # our audio I/O (the wheel bundles libsndfile)
  omegaconf==2.4.0                                      # s3prl
  librosa==0.11.0 audioread==3.1.0 soxr==1.1.0 pooch==1.9.0 platformdirs==4.14.8 decorator==5.3.1  # s3prl's LoadAudio
  editdistance==0.8.1 more-itertools==10.8.0            # imported by s3prl.problem
)
SOURCE_ONLY=(s3prl==0.4.18)  # pure Python, published as a source archive only: built into a wheel here
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"
"$PY" - "$DEST" <<'PYEOF'
"""Every carried wheel's requirements (markers evaluated for CPython 3.12 on Linux x86_64) must be carried
or on the GPU image; one version per package; the total under the device's 64 MiB."""
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The image's packages, from /work/.library/device/KINDS.md ("Python packages already there", 2026-11-17).
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split()
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
dest = Path(sys.argv[1])
wheels = sorted(dest.glob("*.whl"))
carried, problems = {}, []
for w in wheels:
    name = canonicalize_name(w.name.split("-")[0])
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name].name} and {w.name} (keep one)")
    carried[name] = w
present = set(carried) | {canonicalize_name(n) for n in IMAGE}
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        if canonicalize_name(req.name) not in present:
            problems.append(f"{w.name} needs {req.name}, which is neither carried nor on the GPU image")
size = sum(w.stat().st_size for w in wheels)
print(f"{len(wheels)} wheels in {dest}, {size / 2**20:.1f} MiB")
if size > 48 * 2**20:  # the device carries 64 MiB in all, the repository included
    problems.append(f"{size / 2**20:.1f} MiB of wheels leaves too little of the device's 64 MiB for the tree")
if problems:
    sys.exit("error: " + "\n  ".join(problems))
PYEOF
