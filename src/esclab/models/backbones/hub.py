"""Hugging Face checkpoints as pipeline inputs: a hub id or a local folder, resolved to a folder and hashed.

Every pretrained model that comes through `transformers` (wav2vec2, HuBERT, WavLM,
Whisper, AST, CLAP) is named by one setting that takes either a hub id
(`facebook/wav2vec2-base`) or a folder written by `save_pretrained` /
`huggingface-cli download --local-dir`. `resolve` turns it into a local folder
first (the hub's cache for an id; `HF_HUB_OFFLINE=1` is honoured by
`huggingface_hub` itself), so everything after it loads from disk, and the sha256
of the folder's weight files is what a cache or a run records, as for a pinned
weights file. A hub id takes a revision, `facebook/wav2vec2-base@<commit>`; without
one the hub's current one is taken, and the log names the commit it resolved to and
how to pin it, which the embedding cache also records (`Checkpoint.exact_name`), so that
serving rebuilds a backbone from the very revision the model was trained on. A hub
that cannot be reached, an id or revision that does not exist, or a folder without a
model ends in one line naming the setting and the offline fix.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from esclab.errors import EsclabError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("*.safetensors", "*.bin")  # what a checkpoint's numbers live in (the hash covers these)
NEEDED = [*WEIGHT_FILES, "*.json", "*.txt", "*.model"]  # weights, configs, vocabularies; not other frameworks' copies


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: the setting's value, the local folder holding it, and the sha256 of its weights."""

    name: str
    folder: Path
    sha256: str
    revision: str | None = None  # the hub commit a hub id resolved to; None for a local folder

    @property
    def exact_name(self) -> str:
        """The setting that names exactly these weights: the folder, or the hub id at its resolved revision."""
        return f"{hub_id(self.name)[0]}@{self.revision}" if self.revision else self.name


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


def hub_id(name: str) -> tuple[str, str | None]:
    """A hub id and its revision: `org/model@rev` -> (org/model, rev), `org/model` -> (org/model, None)."""
    repo_id, _, revision = str(name).partition("@")
    return repo_id, revision or None


def resolve(name: str | Path, setting: str) -> Checkpoint:
    """The checkpoint `name` (the value of `setting`) as a local folder with its weights' sha256 (and the hub
    revision it resolved to)."""
    folder = local_folder(name, setting)
    revision = None
    if not Path(name).expanduser().is_dir():  # from the hub: its cache keeps each revision in snapshots/<commit>/
        revision = folder.name
        if hub_id(name)[1] is None:
            log.info("%s=%s is the hub's revision %s today; to keep these weights: %s=%s@%s", setting, name,
                     revision, setting, name, revision)
    return Checkpoint(name=str(name), folder=folder, sha256=weights_sha256(folder), revision=revision)


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
        folder = download(*hub_id(name), setting)
    if not (folder / "config.json").is_file() or not weight_files(folder):
        raise EsclabError(f"{setting}={name}: {folder} holds no config.json and weights (*.safetensors or *.bin); "
                          f"point it at a folder written by save_pretrained")
    return folder


def download(repo_id: str, revision: str | None, setting: str) -> Path:
    """The hub's cached snapshot of `repo_id` at `revision` (its current one if None), fetched first unless
    HF_HUB_OFFLINE=1 (then only the cache counts)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    named = f"{setting}={repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=NEEDED))
    except RevisionNotFoundError:
        raise EsclabError(f"{named}: the hub has no revision {revision} of {repo_id}: check the commit, or "
                          f"{offline_fix(setting)}") from None
    except (RepositoryNotFoundError, HFValidationError):  # gated repositories included
        raise EsclabError(f"{named} is not a model the hub lets us download, nor a folder here: check "
                          f"the id, or {offline_fix(setting)}") from None
    except OSError:  # the hub's LocalEntryNotFoundError, and connection errors
        cause = "HF_HUB_OFFLINE=1 and it is not in the hub's cache" if constants.HF_HUB_OFFLINE \
            else "the Hugging Face hub cannot be reached"
        raise EsclabError(f"{named}: {cause}; {offline_fix(setting)}") from None


@dataclass(frozen=True)
class HubWeights:
    """A frozen hub backbone's weights, as the embedding cache checks them (the `pinned` of a backbone class, like
    weights.py's PinnedWeights): `features.weights.<backbone>` names a hub id or a folder, `default` when null."""

    backbone: str  # the key in BACKBONES, which names the setting
    default: str  # the hub id used when the setting is null

    @property
    def setting(self) -> str:
        return f"features.weights.{self.backbone}"

    def checkpoint(self, weights: str | Path | None) -> Checkpoint:
        return resolve(weights or self.default, self.setting)

    def checked(self, weights: str | Path | None) -> tuple[Path, str]:
        checkpoint = self.checkpoint(weights)
        return checkpoint.folder, checkpoint.sha256
