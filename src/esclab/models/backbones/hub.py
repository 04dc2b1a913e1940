"""Hugging Face checkpoints as pipeline inputs: a hub id or a local folder, resolved to a folder and hashed.

Every pretrained model that comes through `transformers` (wav2vec2, HuBERT, WavLM,
Whisper, AST, CLAP) is named by one setting that takes either a hub id
(`facebook/wav2vec2-base`) or a folder written by `save_pretrained` /
`huggingface-cli download --local-dir`. `resolve` turns it into a local folder
first (the hub's cache for an id; `HF_HUB_OFFLINE=1` is honoured by
`huggingface_hub` itself), so everything after it loads from disk, and the sha256
of the folder's weight files is what a cache or a run records, as for a pinned
weights file. A hub that cannot be reached, an id that does not exist, or a folder
without a model ends in one line naming the setting and the offline fix.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from esclab.errors import EsclabError

WEIGHT_FILES = ("*.safetensors", "*.bin")  # what a checkpoint's numbers live in (the hash covers these)
NEEDED = [*WEIGHT_FILES, "*.json", "*.txt", "*.model"]  # weights, configs, vocabularies; not other frameworks' copies


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: the setting's value, the local folder holding it, and the sha256 of its weights."""

    name: str
    folder: Path
    sha256: str


def quiet_transformers() -> None:
    """Before loading: transformers' notes on a newly initialised head (a classifier for our classes, or one a frozen
    encoder does not use) and its per-load progress bars are expected on every load, not news."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def offline_fix(setting: str) -> str:
    return (f"download it where the hub can be reached (`huggingface-cli download <id> --local-dir DIR`), copy DIR "
            f"here and set {setting}=DIR")


def weight_files(folder: Path) -> list[Path]:
    return sorted({path for pattern in WEIGHT_FILES for path in folder.glob(pattern)})


def weights_sha256(folder: Path) -> str:
    """One sha256 over the folder's weight files, in name order (a model split into shards hashes as a whole)."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def resolve(name: str | Path, setting: str) -> Checkpoint:
    """The checkpoint `name` (the value of `setting`) as a local folder with its weights' sha256."""
    folder = local_folder(name, setting)
    return Checkpoint(name=str(name), folder=folder, sha256=weights_sha256(folder))


def local_folder(name: str | Path, setting: str) -> Path:
    """The checkpoint `name` (the value of `setting`) as a local folder holding a config and weights, not hashed:
    for loading it where its hash is already on record (the run key hashed it, models/__init__.py)."""
    if not name:
        raise EsclabError(f"{setting} is not set: name a Hugging Face hub id or a folder written by save_pretrained")
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if Path(name).is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:
            raise EsclabError(f"{setting}={name}: no such folder; point it at a folder written by save_pretrained, "
                              f"or at a hub id such as facebook/wav2vec2-base")
        folder = download(str(name), setting)
    if not (folder / "config.json").is_file() or not weight_files(folder):
        raise EsclabError(f"{setting}={name}: {folder} holds no config.json and weights (*.safetensors or *.bin); "
                          f"point it at a folder written by save_pretrained")
    return folder


def download(repo_id: str, setting: str) -> Path:
    """The hub's cached snapshot of `repo_id`, fetched first unless HF_HUB_OFFLINE=1 (then only the cache counts)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=NEEDED))
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):  # gated repositories included
        raise EsclabError(f"{setting}={repo_id} is not a model the hub lets us download, nor a folder here: check "
                          f"the id, or {offline_fix(setting)}") from None
    except OSError:  # the hub's LocalEntryNotFoundError, and connection errors
        cause = "HF_HUB_OFFLINE=1 and it is not in the hub's cache" if constants.HF_HUB_OFFLINE \
            else "the Hugging Face hub cannot be reached"
        raise EsclabError(f"{setting}={repo_id}: {cause}; {offline_fix(setting)}") from None


@dataclass(frozen=True)
class HubWeights:
    """A frozen hub backbone's weights, as the embedding cache checks them (the `pinned` of a backbone class, like
    weights.py's PinnedWeights): `features.weights.<backbone>` names a hub id or a folder, `default` when null."""

    backbone: str  # the key in BACKBONES, which names the setting
    default: str  # the hub id used when the setting is null

    @property
    def setting(self) -> str:
        return f"features.weights.{self.backbone}"

    def checked(self, weights: str | Path | None) -> tuple[Path, str]:
        checkpoint = resolve(weights or self.default, self.setting)
        return checkpoint.folder, checkpoint.sha256
