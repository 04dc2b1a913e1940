"""How files become the feature cache's rows (`features.clips`), for every representation.

- `pad` (the default): one row per file, the file zero-padded or trimmed to `features.duration`.
- `windows`: one row per window of `features.duration` seconds, a window every `features.hop`
  seconds (null: every `duration`, no overlap), each labelled with its file's class and carrying
  its file's fold and src_file, so one file's windows never sit on two sides of a split. The first
  window starts at 0 whatever the file's length (a file shorter than a window is one zero-padded
  window); each later one is kept only while at least half of it is audio, so the training set is
  not filled with mostly silent windows. (`esclab predict` covers every second of a recording
  instead, since it averages its windows: a short last window there weighs as much as any other.)

The window list is made once, from the files' headers (soundfile.info, no decoding), and written
as the cache's index.csv: the split table's columns plus `start` (seconds). The decoders then
cut each file's windows from one resampled decode of the whole file (data/features.py's `cut`).
"""

import math

import pandas as pd
import soundfile as sf

from esclab.errors import EsclabError

CLIPS = ("pad", "windows")
# What a cache whose features.json names no clips was cut as: a padded one (see `recorded`).
BEFORE_WINDOWS = {"clips": "pad", "hop": None}


def check_clips(clips: str, hop: float | None) -> None:
    """Refuse a `features.clips` / `features.hop` pair that does not say how to cut the files."""
    if clips not in CLIPS:
        raise EsclabError(f"features.clips must be one of {', '.join(CLIPS)}; got {clips!r}")
    if hop is None:
        return
    if isinstance(hop, bool) or not isinstance(hop, (int, float)) or not hop > 0:
        raise EsclabError(f"features.hop must be positive seconds or null, got {hop!r}")
    if clips != "windows":
        raise EsclabError(f"features.hop={hop} only applies to features.clips=windows: set features.clips=windows, "
                          "or features.hop=null")


def recorded(settings: dict) -> dict:
    """A cache's settings as its features.json records them: clips and hop only when it holds windows, so a padded
    cache is byte for byte what it was before features.clips existed (its DVC hash, and the results recorded with
    it, unchanged)."""
    if settings["clips"] == "windows":
        return settings
    return {name: value for name, value in settings.items() if name not in BEFORE_WINDOWS}


def window_starts(seconds: float, duration: float, hop: float) -> list[float]:
    """The starts (seconds) of the windows of a file `seconds` long: 0, then every `hop` while at least half a
    window (`duration` / 2 seconds) of audio is left from the start."""
    later = math.floor((seconds - duration / 2) / hop + 1e-9)  # the tolerance keeps an exact fit from rounding away
    return [round(k * hop, 6) for k in range(1 + max(0, later))]


def file_seconds(path: str) -> float:
    """A file's length from its header."""
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise EsclabError(f"cannot read the length of {path} ({err}); replace the file, or remove it and its row "
                          "from the split table") from None
    return info.frames / info.samplerate


def windows(table: pd.DataFrame, duration: float, hop: float | None = None) -> pd.DataFrame:
    """The split table with one row per window of each file (its row repeated) and the window's `start` column."""
    starts = [window_starts(file_seconds(path), duration, hop or duration) for path in table["path"]]
    rows = table.loc[table.index.repeat([len(s) for s in starts])].reset_index(drop=True)
    rows["start"] = [start for file in starts for start in file]
    return rows


def cache_rows(table: pd.DataFrame, settings) -> pd.DataFrame:
    """The cache's rows for a representation's `settings` (duration, clips, hop): the split table itself, or its
    windows."""
    return windows(table, settings.duration, settings.hop) if settings.clips == "windows" else table


def file_starts(rows: pd.DataFrame) -> list[tuple[str, list[float]]]:
    """Each file of the cache's rows, in row order, with its rows' starts (a padded file's one row starts at 0)."""
    starts = rows["start"] if "start" in rows else pd.Series(0.0, index=rows.index)
    runs = (rows["path"] != rows["path"].shift()).cumsum()  # a file's rows are consecutive
    return [(rows["path"][group.index[0]], group.tolist()) for _, group in starts.groupby(runs, sort=False)]
