"""A quiet log: the libraries' warnings and notices that esclab has traced and understood, silenced by message.

Each entry says where the warning comes from and why it is not esclab's to act on;
anything not listed here still shows. The test suite applies the same list
(tests/conftest.py), so a new warning stands out there too.
"""

import logging
import warnings

# (regular expression matching the start of the message, category, where it comes from and why it is silenced)
KNOWN_WARNINGS = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "Lightning 2.6's own pytree helper, on every training batch, calls what torch 2.14 deprecated"),
    (r"The ``noload`` loader strategy is deprecated", DeprecationWarning,
     "MLflow's SQLAlchemy tracking store, when it opens a sqlite:/// database"),
    (r"Starting with pandas version 4\.0 all arguments of all will be keyword-only", DeprecationWarning,
     "MLflow's dataset digest (mlflow/data/digest_utils.py), when a split table is logged as a run input"),
    (r"Checkpoint directory .* exists and is not empty", UserWarning,
     "Lightning, when a killed fold resumes: esclab clears a fold's checkpoint folder unless it resumes from it"),
    (r"'(aifc|audioop|sunau)' is deprecated and slated for removal in Python 3\.13", DeprecationWarning,
     "audioread, librosa's fallback decoder, imported by the librosa reference in tests and bench/features.py"),
    (r"`(consider_prior|prior_weight|consider_magic_clip|consider_endpoints|warn_independent_sampling)` has been "
     r"deprecated", FutureWarning,
     "hydra-optuna-sweeper 1.3.0's TPE config, which passes every argument Optuna 2's TPESampler had; Optuna keeps "
     "them until 6.0 (requirements.lock pins 5.0.0)"),
    (r"(Int)?(Log|Discrete)?UniformDistribution has been deprecated in v3\.0\.0", FutureWarning,
     "hydra-optuna-sweeper 1.3.0, which builds Optuna 2's distribution classes; Optuna keeps them until 6.0"),
]
# (logger, start of the message, where it comes from and why it is dropped): log lines, not warnings.
KNOWN_LOG_LINES = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging",
     "Lightning's advertisement for its hosted logger, printed by every Trainer; esclab logs to MLflow"),
    ("root", "Please consider to run pre-processing before quantization",
     "onnxruntime's quantize_dynamic: its shape pre-processing is for static quantisation, esclab's is dynamic"),
    ("root", "Please check if the model is already quantized",
     "onnxruntime's quantize_dynamic, seeing YAMNet's 8-bit layers, which esclab export leaves as they are"),
]


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def silence_known_noise() -> None:
    """Apply KNOWN_WARNINGS and KNOWN_LOG_LINES in this process (spawned ones call it again)."""
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in dict.fromkeys(name for name, _, _ in KNOWN_LOG_LINES):
        logger = logging.getLogger(None if name == "root" else name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(tuple(start for n, start, _ in KNOWN_LOG_LINES if n == name)))


def pytest_filters() -> list[str]:
    """KNOWN_WARNINGS as pytest `filterwarnings` lines."""
    return [f"ignore:{message}:{category.__name__}" for message, category, _ in KNOWN_WARNINGS]
