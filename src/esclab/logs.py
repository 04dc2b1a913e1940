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
]
# Lightning's advertisement for its hosted logger, printed by every Trainer; esclab logs to MLflow.
ADVERTISEMENT = "💡 Tip: For seamless cloud logging"


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(ADVERTISEMENT)


def silence_known_noise() -> None:
    """Apply KNOWN_WARNINGS and drop Lightning's advertisement, in this process (spawned ones call it again)."""
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advertisement not in logger.filters:
        logger.addFilter(_not_an_advertisement)


def pytest_filters() -> list[str]:
    """KNOWN_WARNINGS as pytest `filterwarnings` lines."""
    return [f"ignore:{message}:{category.__name__}" for message, category, _ in KNOWN_WARNINGS]
