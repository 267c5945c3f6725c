"""Score calibration: an affine map of raw cosine scores to log-likelihood ratios, fitted on a named trial list.

    llr = slope * cosine + offset

The map is logistic regression of the labels on the score with the two classes weighted equally, i.e. it
minimises Cllr on the calibration list (the prior-weighted objective of BOSARIS/WeSpeaker calibration at
P_eff = 0.5, where the log posterior odds are the LLR). It is fitted per checkpoint, since every
checkpoint's scores have their own scale, and never on the list whose calibrated metrics are reported:
results name the list it was fitted on. Saved as calibration.json:

  {"format_version": 1, "slope": 9.1, "offset": -4.2, "method": "...",
   "fitted_on": {"trials": "dev", "num_trials": 1680, "num_target": 840, "step": 500, "ckpt_dir": "..."},
   "cllr_on_fit_list": 0.52, "min_cllr_on_fit_list": 0.50}

The two Cllr figures describe the fit itself (not held-out numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asv.errors import CheckpointError, ConfigError, one_line
from asv.metrics import cllr, min_cllr

FORMAT_VERSION = 1
METHOD = "logistic regression of label on cosine score, classes weighted equally (minimises Cllr on the list)"


@dataclass
class Calibration:
    slope: float
    offset: float
    # Where it was fitted: trial list name and counts, checkpoint step and directory.
    fitted_on: dict = field(default_factory=dict)
    method: str = METHOD
    cllr_on_fit_list: float | None = None
    min_cllr_on_fit_list: float | None = None

    def llr(self, scores) -> np.ndarray:
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def score_at(self, llr: float) -> float:
        """The cosine score whose LLR is `llr` (the map is increasing): a Bayes threshold on the raw scale."""
        return (llr - self.offset) / self.slope

    @property
    def list_name(self) -> str:
        return str(self.fitted_on.get("trials", "?"))

    def describe(self) -> str:
        n = self.fitted_on.get("num_trials")
        return f"calibrated on '{self.list_name}'" + (f" ({n} trials)" if n else "")

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Read and validate calibration.json: every problem is one CheckpointError line naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{path} is unreadable ({one_line(err)})") from None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            version = data.get("format_version") if isinstance(data, dict) else None
            raise CheckpointError(
                f"{path}: calibration format_version {version!r}, this code reads {FORMAT_VERSION}; re-export the model"
            )
        slope, offset = data.get("slope"), data.get("offset")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (slope, offset)) or slope <= 0:
            raise CheckpointError(f"{path}: slope and offset must be finite numbers with slope > 0")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def fit_calibration(scores, labels, fitted_on: dict) -> Calibration:
    """Fit llr = slope * score + offset on one trial list. A list whose scores separate the classes perfectly
    has no finite maximum-likelihood fit (the slope grows without bound): that is a ConfigError asking for a
    larger list, rather than a calibration that claims certainty."""
    from sklearn.linear_model import LogisticRegression  # scikit-learn loads (~1 s) only when a list is calibrated

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(int)
    name = fitted_on.get("trials", "the calibration list")
    if labels.min() == labels.max():
        raise ConfigError(f"cannot calibrate on '{name}': it needs both target and non-target trials")
    if scores[labels == 1].min() > scores[labels == 0].max():
        raise ConfigError(
            f"cannot calibrate on '{name}': its {len(labels)} trials are perfectly separated, so the fit has no "
            "finite slope; name a larger or harder list with --calibration_list"
        )
    # C = inf: no regularisation, the plain maximum-likelihood fit; tol tight enough that the fitted pair is the
    # Cllr minimum to float precision (two parameters: the solver converges in a few iterations).
    model = LogisticRegression(C=np.inf, class_weight="balanced", tol=1e-12, max_iter=1000)
    model.fit(scores[:, None], labels)
    slope, offset = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not slope > 0:
        raise ConfigError(
            f"cannot calibrate on '{name}': higher scores are not more often same-speaker trials there "
            f"(fitted slope {slope:.3g}); is the model trained?"
        )
    info = {**fitted_on, "num_trials": len(labels), "num_target": int(labels.sum())}
    cal = Calibration(slope, offset, info)
    cal.cllr_on_fit_list = cllr(cal.llr(scores), labels)
    cal.min_cllr_on_fit_list = min_cllr(scores, labels)
    return cal


def posterior(llr, prior: float):
    """P(same speaker | score) at the prior P(same) = `prior`: the logistic of llr + logit(prior)."""
    if not 0.0 < prior < 1.0:
        raise ConfigError(f"prior must be strictly between 0 and 1, got {prior}")
    x = np.asarray(llr, dtype=np.float64) + math.log(prior / (1.0 - prior))
    return 1.0 / (1.0 + np.exp(-x))
