"""A small ESC-50 look-alike, made offline, byte for byte the same for the same settings.

Tests and `make demo` need a dataset without the network and within seconds. Writing
it in ESC-50's exact layout (ESC-50-master/audio/*.wav, meta/esc50.csv) lets the real
download, split and features code run on it unchanged, so a pass here means something.
Each class is a fixed recipe (a tone at its own pitch, harmonics, a sweep, amplitude
modulation, band noise, clicks) that every clip varies (detune, onset, length, gain,
background noise, digital silence, clipping): learnable by a small CNN, not a constant.
Two settings make it harder: `separation` pulls every class's recipe towards the
average one, until classes differ only subtly (in pitch by less than a recording's
detune), and `snr_db` buries the events in more background noise.
"""

import gzip
import io
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from esclab.atomic import atomic_dir, atomic_file
from esclab.errors import EsclabError

CATEGORIES: tuple[str, ...] = (
    "dog", "rooster", "pig", "cow", "frog", "cat", "hen", "insects", "sheep", "crow", "rain", "sea_waves",
    "crackling_fire", "crickets", "chirping_birds", "water_drops", "wind", "pouring_water", "toilet_flush",
    "thunderstorm", "crying_baby", "sneezing", "clapping", "breathing", "coughing", "footsteps", "laughing",
    "brushing_teeth", "snoring", "drinking_sipping", "door_wood_knock", "mouse_click", "keyboard_typing",
    "door_wood_creaks", "can_opening", "washing_machine", "vacuum_cleaner", "clock_alarm", "clock_tick",
    "glass_breaking", "helicopter", "chainsaw", "siren", "car_horn", "engine", "train", "church_bells",
    "airplane", "fireworks", "hand_saw",
)  # index = ESC-50's target number
ESC10: frozenset[str] = frozenset({"dog", "rooster", "rain", "sea_waves", "crackling_fire", "crying_baby",
                                   "sneezing", "clock_tick", "helicopter", "chainsaw"})
TOP = "ESC-50-master"
META_HEADER = "filename,fold,target,category,esc10,src_file,take"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no trace of when it was written


@dataclass(frozen=True)
class _Clip:
    """One WAV's place in ESC-50's naming, plus what its source recording shares across takes."""

    fold: int
    src_file: int
    take: str
    target: int
    detune: float  # pitch factor: takes of one recording sound alike, as real ones do
    snr_db: float  # event over background noise
    tint: float  # background spectral slope: 0 white, 1 pink, 2 brown

    @property
    def filename(self) -> str:
        return f"{self.fold}-{self.src_file}-{self.take}-{self.target}.wav"


@dataclass(frozen=True)
class Settings:
    """dataset.synthetic: what to generate. It refuses what cannot make an ESC-50-shaped dataset."""

    n_classes: int = 50
    clips_per_class: int = 10
    duration: float = 5.0  # seconds
    sample_rate: int = 44100
    seed: int = 0
    n_folds: int = 5
    separation: float = 1.0  # 1: each class its own recipe; towards 0: every class the average recipe
    snr_db: tuple[float, float] = (10.0, 30.0)  # each recording's event-over-background level is drawn from this

    def __post_init__(self):
        s = "dataset.synthetic"
        if not 1 <= self.n_classes <= len(CATEGORIES):
            raise EsclabError(f"{s}.n_classes must be between 1 and 50, got {self.n_classes}; ESC-50 has 50 class names to reuse")
        if self.n_folds < 1:
            raise EsclabError(f"{s}.n_folds must be at least 1, got {self.n_folds}; ESC-50 uses 5")
        if self.clips_per_class < self.n_folds:
            raise EsclabError(f"{s}.clips_per_class must be at least n_folds ({self.n_folds}) so every class is in every "
                              f"fold, got {self.clips_per_class}; raise it")
        if not self.duration > 0:
            raise EsclabError(f"{s}.duration must be positive seconds, got {self.duration}; ESC-50 uses 5.0")
        if self.sample_rate < 8000:
            raise EsclabError(f"{s}.sample_rate must be at least 8000 Hz, got {self.sample_rate}; ESC-50 uses 44100")
        if not 0 < self.separation <= 1:
            raise EsclabError(f"{s}.separation must be in (0, 1], got {self.separation}; 1 keeps classes far apart")
        snr_db = tuple(float(db) for db in self.snr_db)  # a list from the config
        if len(snr_db) != 2 or snr_db[0] > snr_db[1]:
            raise EsclabError(f"{s}.snr_db must be [low, high] in dB with low <= high, got {list(snr_db)}")
        object.__setattr__(self, "snr_db", snr_db)


def _recording(rng: np.random.Generator, snr_db: tuple[float, float] = (10.0, 30.0)) -> dict:
    """What the takes (or slices) of one source recording share: its detune, its level over the background (dB)
    and the background's tint (_Clip's fields)."""
    return dict(detune=rng.uniform(0.97, 1.03), snr_db=rng.uniform(*snr_db), tint=rng.uniform(0.5, 1.5))


def _layout(rng: np.random.Generator, settings: Settings) -> list[_Clip]:
    """Every class in every fold, each recording's 1-3 takes in one fold so no fold split can leak."""
    n_folds, clips_per_class = settings.n_folds, settings.clips_per_class
    recordings = []  # (target, fold, n_takes)
    for target in range(settings.n_classes):
        per_fold = np.full(n_folds, clips_per_class // n_folds)
        per_fold[(target + np.arange(clips_per_class % n_folds)) % n_folds] += 1  # rotate the remainder
        for fold, left in enumerate(per_fold.tolist(), start=1):
            while left:
                takes = min(left, int(rng.integers(1, 4)))
                recordings.append((target, fold, takes))
                left -= takes
    ids = rng.choice(900_000, size=len(recordings), replace=False) + 100_000  # six digits, like Freesound's
    clips = []
    for (target, fold, takes), src in zip(recordings, ids.tolist()):
        shared = _recording(rng, settings.snr_db)
        clips += [_Clip(fold, src, "ABC"[i], target, **shared) for i in range(takes)]
    return sorted(clips, key=lambda c: c.filename)


def _noise(rng: np.random.Generator, magnitude: np.ndarray, n: int) -> np.ndarray:
    """Unit-RMS noise with this magnitude spectrum: random phases and one inverse FFT (no forward one)."""
    phase = rng.random(magnitude.size, dtype=np.float32) * (2 * np.pi)
    spectrum = np.empty(magnitude.size, np.complex64)
    spectrum.real, spectrum.imag = magnitude * np.cos(phase), magnitude * np.sin(phase)
    noise = np.fft.irfft(spectrum, n=n)
    return noise / max(float(noise.std()), 1e-12)


def _pick(options, index: int, separation: float, *, log: bool = False) -> float:
    """options[index], moved towards the options' mean (geometric if log) as separation falls from 1 to 0."""
    own = float(options[index % len(options)])
    if log:
        return own * (float(np.exp(np.mean(np.log(options)))) / own) ** (1 - separation)
    return own * separation + float(np.mean(options)) * (1 - separation)  # exactly own at separation 1


def _render(clip: _Clip, rng: np.random.Generator, n: int, sr: int, separation: float) -> np.ndarray:
    """One clip as int16, computed in float32 for speed.

    Mixed-radix digits of the target pick the recipe, so classes share some ingredients
    but never all: (pitch, sweep) alone already differs between any two classes. Below
    separation 1 every class value moves towards the average, and overtones fade, so the
    classes keep their order but the gaps between them shrink.
    """
    k = clip.target
    pitch = _pick(np.geomspace(150, min(3000, 0.15 * sr), 25), 7 * k, separation, log=True) * clip.detune
    sweep = _pick((0, 1, -1), k, separation)  # octaves over the event: steady, up, down
    harmonics = np.arange(1, 1 + (1, 2, 4, 8)[k // 3 % 4], dtype=np.float32)
    overtone_gain = np.where(harmonics == 1, 1, separation).astype(np.float32)
    am_hz = _pick((0, 3, 7, 13), k // 2, separation)
    band = _pick(np.geomspace(300, 0.3 * sr, 8), 3 * k + 1, separation, log=True) * np.array([0.7, 1.4])  # an octave of noise
    noise_level = _pick((0.2, 0.5, 1.0), k // 4, separation)
    clicks_hz = _pick((0, 0, 3, 9), k // 7, separation)

    length = max(1, round(n * rng.uniform(0.4, 1.0)))
    padded = rng.random() < 0.2  # ESC-50 pads short sounds with digital silence
    onset = 0 if padded else int(rng.integers(0, n - length + 1))
    t = np.arange(length, dtype=np.float64)
    rate = sweep * np.log(2) / length  # exponential sweep, its phase integrated in closed form
    cycles = pitch / sr * (np.expm1(rate * t) / rate if sweep else t)
    phase = (2 * np.pi * (cycles - np.floor(cycles))).astype(np.float32)  # wrap in float64: float32 is then exact enough
    i = t.astype(np.float32)
    audible = pitch * harmonics * 2.0 ** max(sweep, 0) < 0.45 * sr  # none above Nyquist
    h, gain = harmonics[audible][:, None], overtone_gain[audible][:, None]
    tone = (np.sin(h * phase + rng.random(h.shape, dtype=np.float32) * (2 * np.pi)) / h * gain).sum(0)
    env = np.minimum(1, np.minimum(i + 1, length - i) / (0.01 * sr))  # 10 ms fades, no step clicks
    if am_hz:
        env *= 1 - 0.4 * (1 + np.sin(2 * np.pi * am_hz / sr * i + rng.uniform(0, 2 * np.pi)))
    event = env * tone
    freqs = np.fft.rfftfreq(n, 1 / sr).astype(np.float32)
    in_band = ((freqs > band[0]) & (freqs < band[1])).astype(np.float32)
    event += noise_level * env * _noise(rng, in_band, n)[:length]
    if clicks_hz:
        size = round(0.01 * sr)
        burst = np.exp(-np.arange(size) / (0.002 * sr)) * rng.standard_normal(size)
        at = rng.integers(0, length, rng.poisson(clicks_hz * length / sr))[:, None] + np.arange(size)
        inside = at < length
        np.add.at(event, at[inside], (rng.uniform(0.5, 2, (len(at), 1)) * burst)[inside].astype(np.float32))

    level = np.sqrt(np.mean(event**2)) / 10 ** (clip.snr_db / 20)
    audio = level * _noise(rng, np.maximum(freqs, 20) ** np.float32(-clip.tint / 2), n)
    audio[onset:onset + length] += event
    if padded:
        audio[onset + length:] = 0
    clipped = rng.random() < 0.03  # a few field recordings overload the recorder
    gain_db = rng.uniform(3, 12) if clipped else rng.uniform(-20, -3)  # peak level, dBFS
    audio *= 10 ** (gain_db / 20) / max(float(np.abs(audio).max()), 1e-12)
    return np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)


def _members(settings: Settings) -> Iterator[tuple[str, bytes | None]]:
    """(path under ESC-50-master/, bytes or None for a folder), in sorted path order."""
    rng = np.random.default_rng(settings.seed)
    clips = _layout(rng, settings)
    sr = settings.sample_rate
    n = max(1, round(settings.duration * sr))
    yield "", None
    yield "audio/", None
    for clip in clips:
        buffer = io.BytesIO()
        sf.write(buffer, _render(clip, rng, n, sr, settings.separation), sr, format="WAV", subtype="PCM_16")
        yield f"audio/{clip.filename}", buffer.getvalue()
    rows = [f"{c.filename},{c.fold},{c.target},{CATEGORIES[c.target]},{CATEGORIES[c.target] in ESC10},{c.src_file},{c.take}"
            for c in clips]
    yield "meta/", None
    yield "meta/esc50.csv", "\n".join([META_HEADER, *rows, ""]).encode()


def write_tree(root: Path, **settings) -> Path:
    """Write the unpacked dataset, as if the archive had been extracted into `root`, for tests.

    `settings` are the fields of Settings (dataset.synthetic's keys and n_folds).
    """
    members = _members(Settings(**settings))
    with atomic_dir(Path(root) / TOP) as tmp:
        for rel, data in members:
            if data is None:
                (tmp / rel).mkdir(exist_ok=True)
            else:
                (tmp / rel).write_bytes(data)
    return Path(root) / TOP


def write_archive(path: Path, **settings) -> Path:
    """Write a zip shaped like GitHub's ESC-50 master.zip, so the download stage's archive path is exercised."""
    path = Path(path)
    members = _members(Settings(**settings))
    # ZIP_STORED: noisy PCM barely deflates (a few %) and deflating ~200 MB would cost seconds.
    with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for rel, data in members:
            info = zipfile.ZipInfo(f"{TOP}/{rel}", date_time=ZIP_TIME)
            info.create_system = 3  # Unix, wherever it runs, so the bytes match across machines
            info.external_attr = (0o40755 << 16) | 0x10 if data is None else 0o100644 << 16
            archive.writestr(info, data or b"")
    return path


# A folder per class: the shape of a practitioner's own recordings (seeds 000/001: crying / screaming / normal).
FOLDER_CLASSES = {"crying": 10, "screaming": 18, "normal": 50}  # files per class: imbalanced, as theirs are
FOLDER_FORMATS = (("wav", "WAV", "PCM_16"), ("wav", "WAV", "PCM_24"), ("flac", "FLAC", "PCM_16"),
                  ("ogg", "OGG", "VORBIS"))  # (extension, soundfile format, subtype)
FOLDER_RATES = (8000, 16000, 22050, 44100)


@dataclass(frozen=True)
class FolderSettings:
    """dataset.synthetic for dataset=synthetic_folder: what to generate."""

    classes: dict[str, int] | None = None  # class name -> number of files; None: FOLDER_CLASSES
    duration: tuple[float, float] = (0.5, 4.0)  # each file's length in seconds is drawn from this
    seed: int = 0

    def __post_init__(self):
        s = "dataset.synthetic"
        classes = dict(self.classes or FOLDER_CLASSES)  # a DictConfig from the config
        if len(classes) > len(CATEGORIES) or any(not isinstance(n, int) or n < 1 for n in classes.values()):
            raise EsclabError(f"{s}.classes must map at most 50 class names to positive file counts, got {classes}")
        low, high = (float(x) for x in self.duration)
        if not 0 < low <= high:
            raise EsclabError(f"{s}.duration must be [shortest, longest] seconds with 0 < shortest <= longest, "
                              f"got {list(self.duration)}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "duration", (low, high))


def _ogg_crc(page: bytes) -> int:
    """Ogg's page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, starting at 0."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def _fixed_ogg_serial(data: bytes) -> bytes:
    """libsndfile gives each Ogg stream a random serial number; a fixed one keeps the file the same byte for byte."""
    out, at = bytearray(data), 0
    while at < len(out):
        n_segments = out[at + 26]
        size = 27 + n_segments + sum(out[at + 27:at + 27 + n_segments])
        out[at + 14:at + 18] = (1).to_bytes(4, "little")
        out[at + 22:at + 26] = bytes(4)
        out[at + 22:at + 26] = _ogg_crc(bytes(out[at:at + size])).to_bytes(4, "little")
        at += size
    return bytes(out)


def _sound_file(audio: np.ndarray, rate: int, *, stereo: bool, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    """A rendered recording (_render's 16-bit scale) as a sound file's bytes in `fmt` / `subtype`; stereo as a
    stereo recorder gives it, the right channel a little quieter. Ogg's random stream serial is fixed."""
    audio = audio.astype(np.float32) / 32768
    if stereo:
        audio = np.stack([audio, 0.8 * audio], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return _fixed_ogg_serial(buffer.getvalue()) if fmt == "OGG" else buffer.getvalue()


def _folder_members(settings: FolderSettings) -> Iterator[tuple[str, bytes]]:
    """(path under the root, bytes) of every file: `<class>/[session_2/]<source>_<take>.<ext>`.

    A source recording gives 1-3 takes, all of its class, which share pitch and background the way
    real takes do (so a grouped split matters); the second half of a class's sources sit one folder
    deeper. Each file has its own length, rate, channel count and format.
    """
    rng = np.random.default_rng(settings.seed)
    for target, (name, count) in enumerate(settings.classes.items()):
        left, source = count, 0
        while left:
            takes = min(left, int(rng.integers(1, 4)))
            left -= takes
            source += 1
            shared = _recording(rng)
            folder = f"{name}/session_2/" if left < count / 2 else f"{name}/"
            for take in range(1, takes + 1):
                clip = _Clip(1, source, str(take), target, **shared)
                extension, fmt, subtype = FOLDER_FORMATS[int(rng.integers(len(FOLDER_FORMATS)))]
                sr = FOLDER_RATES[int(rng.integers(len(FOLDER_RATES)))]
                n = max(1, round(rng.uniform(*settings.duration) * sr))
                audio = _render(clip, rng, n, sr, 1.0)
                stereo = rng.random() < 0.3
                yield f"{folder}{name}{source:03d}_{take}.{extension}", _sound_file(audio, sr, stereo=stereo, fmt=fmt,
                                                                                   subtype=subtype)


def write_folder_tree(root: Path, **settings) -> Path:
    """Write a folder-per-class tree into `root` (replaced whole): `settings` are FolderSettings' fields."""
    members = _folder_members(FolderSettings(**settings))
    with atomic_dir(Path(root)) as tmp:
        for rel, data in members:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
    return Path(root)


# UrbanSound8K (Salamon, Jacoby & Bello, 2014): slices of at most 4 s cut from Freesound recordings, 10 classes,
# 10 predefined folds, each recording's slices in one fold; every WAV keeps its recording's rate, depth and channels.
URBANSOUND_CLASSES: tuple[str, ...] = (
    "air_conditioner", "car_horn", "children_playing", "dog_bark", "drilling", "engine_idling", "gun_shot",
    "jackhammer", "siren", "street_music",
)  # index = UrbanSound8K's classID
URBANSOUND_TOP = "UrbanSound8K"
URBANSOUND_HEADER = "slice_file_name,fsID,start,end,salience,fold,classID,class"
URBANSOUND_FORMATS = ((44100, "PCM_16"), (48000, "PCM_24"), (22050, "PCM_16"), (44100, "PCM_24"))  # (Hz, subtype)
TAR_TIME = 1_400_000_000  # May 2014, about when UrbanSound8K came out: no trace of when the archive was written


@dataclass(frozen=True)
class UrbanSoundSettings:
    """dataset.synthetic for dataset=synthetic_urbansound8k: what to generate."""

    slices_per_fold: int = 2  # of each class in each fold: 10 classes x 10 folds x 2 = 200 slices
    duration: tuple[float, float] = (0.5, 4.0)  # each slice's length in seconds is drawn from this
    seed: int = 0
    n_folds: int = 10

    def __post_init__(self):
        s = "dataset.synthetic"
        if self.slices_per_fold < 1:
            raise EsclabError(f"{s}.slices_per_fold must be at least 1, got {self.slices_per_fold}; 2 is the default")
        if self.n_folds < 1:
            raise EsclabError(f"dataset.n_folds must be at least 1, got {self.n_folds}; UrbanSound8K uses 10")
        low, high = (float(x) for x in self.duration)
        if not 0 < low <= high <= 4:
            raise EsclabError(f"{s}.duration must be [shortest, longest] seconds with 0 < shortest <= longest <= 4 "
                              f"(UrbanSound8K's slices are at most 4 s), got {list(self.duration)}")
        object.__setattr__(self, "duration", (low, high))


def _urbansound_members(settings: UrbanSoundSettings) -> Iterator[tuple[str, bytes | None]]:
    """(path under UrbanSound8K/, bytes or None for a folder), in sorted path order.

    Each class has `slices_per_fold` slices in every fold, cut 1-3 at a time from one recording (an fsID) that
    stays in its fold; the slices of one recording share its pitch, background, rate, depth and channels, and
    follow each other in it (start, end), as UrbanSound8K's do.
    """
    rng = np.random.default_rng(settings.seed)
    rows, wavs = [], {}
    ids = iter((rng.choice(200_000, size=len(URBANSOUND_CLASSES) * settings.n_folds * settings.slices_per_fold,
                           replace=False) + 100).tolist())  # Freesound ids; one per recording at most
    for fold in range(1, settings.n_folds + 1):
        for class_id, name in enumerate(URBANSOUND_CLASSES):
            left = settings.slices_per_fold
            while left:
                n_slices = min(left, int(rng.integers(1, 4)))
                left -= n_slices
                fs_id, occurrence, at = next(ids), int(rng.integers(0, 5)), rng.uniform(0, 60)
                sr, subtype = URBANSOUND_FORMATS[int(rng.integers(len(URBANSOUND_FORMATS)))]
                stereo, salience = rng.random() < 0.4, int(rng.integers(1, 3))  # 1 foreground, 2 background
                shared = _recording(rng)
                for slice_id in range(n_slices):
                    seconds = rng.uniform(*settings.duration)
                    audio = _render(_Clip(fold, fs_id, str(slice_id), class_id, **shared), rng,
                                    max(1, round(seconds * sr)), sr, 1.0)
                    file_name = f"{fs_id}-{class_id}-{occurrence}-{slice_id}.wav"
                    wavs[f"audio/fold{fold}/{file_name}"] = _sound_file(audio, sr, stereo=stereo, subtype=subtype)
                    rows.append(f"{file_name},{fs_id},{at:.6f},{at + seconds:.6f},{salience},{fold},{class_id},{name}")
                    at += seconds
    yield "", None
    yield "audio/", None
    for fold in range(1, settings.n_folds + 1):
        yield f"audio/fold{fold}/", None
        yield from sorted((path, data) for path, data in wavs.items() if path.startswith(f"audio/fold{fold}/"))
    yield "metadata/", None
    yield "metadata/UrbanSound8K.csv", "\n".join([URBANSOUND_HEADER, *rows, ""]).encode()


def write_urbansound_archive(path: Path, **settings) -> Path:
    """Write a tar.gz shaped like Zenodo's UrbanSound8K.tar.gz (`settings`: UrbanSoundSettings' fields), byte for byte
    the same for the same settings: fixed times and owners, no name or time in the gzip header."""
    path = Path(path)
    members = _urbansound_members(UrbanSoundSettings(**settings))
    # Level 1: noisy PCM barely compresses at any level, and the higher ones cost seconds per archive.
    with (atomic_file(path) as tmp, tmp.open("wb") as raw,
          gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as archive):
        for rel, data in members:
            info = tarfile.TarInfo(f"{URBANSOUND_TOP}/{rel}".rstrip("/"))
            info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_TIME, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), 0o644
            archive.addfile(info, None if data is None else io.BytesIO(data))
    return path


def write_lookalike(layout: str, downloads: Path, name: str, *, n_folds: int, settings: Mapping) -> Path:
    """The download stage's stand-in for dataset.url: dataset.synthetic's look-alike of a `layout` dataset, written
    into `downloads` as the real one arrives: an archive to unpack, or, for a folder per class, the tree itself."""
    if layout == "folder":
        return write_folder_tree(Path(downloads) / name, **settings)  # its folds are the split stage's to make
    if layout == "urbansound8k":
        return write_urbansound_archive(Path(downloads) / f"{name}.tar.gz", n_folds=n_folds, **settings)
    return write_archive(Path(downloads) / f"{name}.zip", n_folds=n_folds, **settings)
