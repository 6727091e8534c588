"""A labelled spoken-word corpus made offline with the Debian TTS engines espeak-ng and flite.

Twenty words (digits and commands, like Speech Commands) spoken by ~50 synthetic voices at
random speeds and pitches, resampled to 16 kHz, trimmed of silence and split so that no voice
(and no speaker behind two voices) is on both sides. It needs no download, builds in about a
minute on 2 cores, and is read back with :class:`~data2vec.data.audio.AudioManifest`.

Layout under ``out``::

    train/<word>/<voice>_<k>.wav    16 kHz mono PCM-16, k = variant number
    test/<word>/<voice>_<k>.wav     voices held out from train
    train.tsv, test.tsv             path<TAB>label<TAB>transcript<TAB>voice, paths relative to out
    README.txt                      how it was made
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data2vec.data.resample import TARGET_SAMPLE_RATE, resample
from data2vec.errors import DataError

log = logging.getLogger(__name__)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DEFAULT_WORDS: tuple[str, ...] = DIGITS + COMMANDS
"""The ten digits and ten commands of Speech Commands v0.01's core set."""

ESPEAK_SPEED_WPM = (120, 220)  # espeak-ng -s; its default is 175
ESPEAK_PITCH = (20, 80)  # espeak-ng -p, 0..99; its default is 50
FLITE_STRETCH = (0.8, 1.3)  # flite duration_stretch: > 1 is slower
FLITE_F0_SCALE = (0.8, 1.25)  # times the voice's own mean pitch
# Mean F0 in Hz of each flite voice at default settings, measured by autocorrelation on
# "zero nine": int_f0_target_mean is absolute, so it is scaled from these. rms ignores it.
_FLITE_F0_HZ = {"kal": 100.0, "kal16": 100.0, "awb": 140.0, "slt": 180.0}
# awb_time is a limited-domain voice (it says clock times) and ignores speed and pitch settings.
_FLITE_EXCLUDED = frozenset({"awb_time"})
_PROBE_ESPEAK = ("-s", "160", "-p", "50")
_INSTALL_HINT = "install the engines with: apt-get install espeak-ng flite"
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z' ]*")
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Voice:
    """One synthetic voice.

    Attributes:
        engine: ``"espeak-ng"`` or ``"flite"``.
        spec: What the engine is given: ``"en-us+m3"`` (accent+variant) or ``"kal16"``.
        speaker: Voices with the same speaker sound alike and stay on one side of the split
            (flite's kal and kal16 are one diphone set at 8 and 16 kHz).
    """

    engine: str
    spec: str
    speaker: str

    @property
    def name(self) -> str:
        """File-name safe id without ``_``: ``espeak-en-us+m3``, ``flite-kal16``."""
        prefix = "espeak" if self.engine == "espeak-ng" else self.engine
        return re.sub(r"[^A-Za-z0-9+-]", "-", f"{prefix}-{self.spec}")


@dataclass(frozen=True)
class _Clip:
    voice: Voice
    word: str
    k: int
    split: str
    args: tuple[str, ...]

    @property
    def relpath(self) -> str:
        return f"{self.split}/{self.word}/{self.voice.name}_{self.k}.wav"


class _SynthError(Exception):
    """One synthesis call failed; the message says how."""


def trim_silence(
    wave: np.ndarray,
    sample_rate: int = TARGET_SAMPLE_RATE,
    threshold_db: float = -40.0,
    margin_s: float = 0.03,
) -> np.ndarray:
    """Cut leading and trailing frames quieter than ``threshold_db`` below the loudest frame.

    Args:
        wave: float ``(S,)``.
        sample_rate: In Hz; frames are 10 ms.
        threshold_db: Frame RMS threshold relative to the loudest frame's RMS, in dB.
        margin_s: Kept on each side of the first and last loud frame, in seconds, so soft
            onsets and releases (``f``, ``s``) are not clipped.

    Returns:
        A view ``(S',)`` of ``wave``; empty when the clip is digital silence.
    """
    hop = sample_rate // 100
    n = len(wave) // hop
    if n == 0:
        return wave[:0]
    rms = np.sqrt(np.mean(wave[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1))
    if rms.max() <= 0.0:
        return wave[:0]
    loud = np.flatnonzero(rms >= rms.max() * 10.0 ** (threshold_db / 20.0))
    margin = round(margin_s * sample_rate)
    return wave[max(0, loud[0] * hop - margin) : min(len(wave), (loud[-1] + 1) * hop + margin)]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise _SynthError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _synthesize(voice: Voice, text: str, args: Sequence[str], tmp: Path) -> np.ndarray:
    """Speak ``text`` into the file ``tmp``; return it at 16 kHz mono, float32, trimmed."""
    if voice.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice.spec, *args, "-w", str(tmp), text]
    else:
        cmd = ["flite", "-voice", voice.spec, *args, "-t", text, "-o", str(tmp)]
    try:
        _run(cmd)
        data, sr = sf.read(tmp, dtype="float32", always_2d=True)  # (S, C)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        raise _SynthError(f"{' '.join(cmd)}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    wave = trim_silence(resample(data.mean(axis=1), sr))
    if len(wave) == 0:
        raise _SynthError(f"{' '.join(cmd)}: silent output")
    return wave


def _parallel(fn: Callable[[_T], _R], items: Sequence[_T], jobs: int, desc: str | None) -> list[_R]:
    """``[fn(x) for x in items]`` on ``jobs`` threads (each mostly waits on a subprocess)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = pool.map(fn, items)
        return list(tqdm(results, total=len(items), desc=desc, disable=desc is None))


def _check_engines() -> None:
    missing = [e for e in ("espeak-ng", "flite") if shutil.which(e) is None]
    if missing:
        raise DataError(
            f"text-to-speech engine(s) not found: {', '.join(missing)}; {_INSTALL_HINT}"
        )


def espeak_accents() -> list[str]:
    """English espeak-ng voices (``espeak-ng --voices=en``), without MBROLA ones.

    MBROLA voices (``mb/...``) need the separate mbrola program and voice data; without them
    espeak-ng fails or silently falls back to its default voice.
    """
    accents: list[str] = []
    for line in _run(["espeak-ng", "--voices=en"]).splitlines()[1:]:
        cols = line.split()  # Pty Language Age/Gender VoiceName File [Other languages]
        usable = len(cols) >= 5 and cols[1] != "variant" and not cols[4].startswith("mb/")
        if usable and cols[1] not in accents:
            accents.append(cols[1])
    return accents


def espeak_variants() -> list[str]:
    """espeak-ng voice variants (``espeak-ng --voices=variant``), sorted; names with spaces
    (``"Mr serious"``) are left out, since ``-v en+<name>`` cannot address them."""
    text = _run(["espeak-ng", "--voices=variant"])
    return sorted(set(re.findall(r"!v/([A-Za-z0-9-]+)(?=\s{2,}|\s*$)", text, flags=re.M)))


def flite_voices() -> list[str]:
    """flite's built-in voices (``flite -lv``), without limited-domain ones."""
    text = _run(["flite", "-lv"])
    names = text.split(":", 1)[-1].split()
    return [v for v in names if v not in _FLITE_EXCLUDED]


def _probe(voices: list[Voice], word: str, jobs: int, tmp: Path, desc: str | None) -> list[str]:
    """Speak ``word`` with each voice at fixed settings: a fingerprint per voice, ``""`` if the
    voice fails. Equal fingerprints mean two voices that sound the same."""

    def one(voice: Voice) -> str:
        args = _PROBE_ESPEAK if voice.engine == "espeak-ng" else ()
        try:
            wave = _synthesize(voice, word, args, tmp / f"probe-{voice.name}.wav")
        except _SynthError as e:
            log.warning("voice %s fails, skipped: %s", voice.name, e)
            return ""
        return hashlib.sha1(np.round(wave * 32767).astype(np.int16).tobytes()).hexdigest()

    return _parallel(one, voices, jobs, desc)


def discover_voices(
    espeak_voices: int, seed: int, jobs: int, tmp: Path, progress: bool = False
) -> tuple[list[Voice], list[str], list[str]]:
    """The voices of the corpus: ``espeak_voices`` espeak-ng accent+variant pairs and flite's.

    Every espeak-ng variant is tried once with the same accent; failing ones and ones that
    sound exactly like an earlier one (e.g. ``klatt`` and ``caleb``) are dropped. A seeded
    sample of the rest is paired with the accents in turn, so each variant (the timbre) appears
    in one voice only and cannot leak across the split.

    Returns:
        ``(voices, failed voice names, duplicate voice names)``.
    """
    _check_engines()
    try:
        accents, variant_names, flite_names = espeak_accents(), espeak_variants(), flite_voices()
    except (_SynthError, OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot list the TTS voices: {e}; {_INSTALL_HINT}") from None
    if not accents:
        raise DataError(f"espeak-ng lists no English voice (--voices=en); {_INSTALL_HINT}")
    base = "en-us" if "en-us" in accents else accents[0]
    candidates = [Voice("espeak-ng", f"{base}+{v}", v) for v in variant_names]
    plain = [Voice("espeak-ng", a, a) for a in accents]
    flite = [Voice("flite", v, re.sub(r"16$", "", v)) for v in flite_names]
    everyone = candidates + plain + flite
    prints = _probe(everyone, "zero", jobs, tmp, "probe voices" if progress else None)
    fingerprint = dict(zip(everyone, prints))
    failed = [v.name for v in everyone if not fingerprint[v]]
    seen: set[str] = set()
    variants, duplicates = [], []
    for voice in candidates:
        if fingerprint[voice] in seen:
            duplicates.append(voice.name)
        elif fingerprint[voice]:
            seen.add(fingerprint[voice])
            variants.append(voice.speaker)
    accents = [v.spec for v in plain if fingerprint[v]]
    if not variants or not accents:
        raise DataError(
            f"espeak-ng produced no usable voice (tried {len(plain)} accents and "
            f"{len(candidates)} variants); {_INSTALL_HINT}"
        )
    rng = np.random.default_rng([seed, 0])
    chosen = [variants[i] for i in rng.permutation(len(variants))[:espeak_voices]]
    voices = [
        Voice("espeak-ng", f"{accents[k % len(accents)]}+{v}", v) for k, v in enumerate(chosen)
    ]
    return voices + [v for v in flite if fingerprint[v]], failed, duplicates


def split_voices(voices: list[Voice], test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each voice to ``"train"`` or ``"test"``, by speaker, separately per engine.

    Each engine holds out ``round(test_fraction · speakers)`` of its speakers, at least one and
    at most all but one (an engine with a single speaker stays in train), so both engines are
    on both sides. Deterministic in ``seed`` and the set of voices.

    Returns:
        Voice name -> split.
    """
    split: dict[str, str] = {}
    for e, engine in enumerate(("espeak-ng", "flite")):
        mine = [v for v in voices if v.engine == engine]
        speakers = sorted({v.speaker for v in mine})
        n = len(speakers)
        n_test = min(max(1, round(test_fraction * n)), n - 1) if n >= 2 else 0
        order = np.random.default_rng([seed, 1, e]).permutation(n)
        held_out = {speakers[i] for i in order[:n_test]}
        split.update({v.name: "test" if v.speaker in held_out else "train" for v in mine})
    return split


def _plan(
    voices: list[Voice], split: dict[str, str], words: Sequence[str], variants: int, seed: int
) -> list[_Clip]:
    """Every clip to make, with its random speed and pitch (two draws each, a stable stream)."""
    rng = np.random.default_rng([seed, 2])
    clips: list[_Clip] = []
    for voice in sorted(voices, key=lambda v: v.name):
        for word in words:
            for k in range(variants):
                u, w = rng.random(2)
                if voice.engine == "espeak-ng":
                    speed = round(ESPEAK_SPEED_WPM[0] + u * np.ptp(ESPEAK_SPEED_WPM))
                    pitch = round(ESPEAK_PITCH[0] + w * np.ptp(ESPEAK_PITCH))
                    args: tuple[str, ...] = ("-s", str(speed), "-p", str(pitch))
                else:
                    stretch = FLITE_STRETCH[0] + u * np.ptp(FLITE_STRETCH)
                    args = ("--setf", f"duration_stretch={stretch:.3f}")
                    if voice.spec in _FLITE_F0_HZ:
                        scale = FLITE_F0_SCALE[0] + w * np.ptp(FLITE_F0_SCALE)
                        f0 = _FLITE_F0_HZ[voice.spec] * scale
                        args += ("--setf", f"int_f0_target_mean={f0:.1f}")
                clips.append(_Clip(voice, word, k, split[voice.name], args))
    return clips


def _render(clip: _Clip, out: Path, tmp: Path) -> str | None:
    """Make one clip's file; ``None`` on success, else why it failed."""
    try:
        wave = _synthesize(clip.voice, clip.word, clip.args, tmp / clip.relpath.replace("/", "~"))
    except _SynthError as e:
        log.warning("clip %s failed: %s", clip.relpath, e)
        return str(e)
    path = out / clip.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(wave, -1.0, 1.0), TARGET_SAMPLE_RATE, subtype="PCM_16")
    return None


def _write_manifest(path: Path, clips: list[_Clip]) -> None:
    lines = ["path\tlabel\ttranscript\tvoice\n"]
    for c in sorted(clips, key=lambda c: c.relpath):
        lines.append(f"{c.relpath}\t{c.word}\t{c.word}\t{c.voice.name}\n")
    path.write_text("".join(lines), encoding="utf-8")


def _version(engine: str) -> str:
    """A one-line version string (flite prints it with exit status 1, so status is ignored)."""
    proc = subprocess.run([engine, "--version"], capture_output=True, text=True, check=False)
    lines = [x.strip() for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    line = next((x for x in lines if "version" in x.lower()), lines[0] if lines else engine)
    return line.split("  Data at")[0]  # espeak-ng appends its data folder


def _write_readme(path: Path, stats: dict[str, Any], voices: dict[str, list[str]]) -> None:
    versions = [_version(e) for e in ("espeak-ng", "flite")]
    text = f"""Synthetic spoken words, made by data2vec.data.synth_speech.synthesize_corpus.

Engines: {versions[0]}; {versions[1]}.
Words (label = transcript = the word): {" ".join(stats["words"])}
Seed: {stats["seed"]}; {stats["variants"]} variants per voice and word.
espeak-ng voices are accent+variant pairs, each variant used once; speed {ESPEAK_SPEED_WPM} wpm
and pitch {ESPEAK_PITCH} drawn uniformly per clip. flite voices: duration_stretch
{FLITE_STRETCH} and mean F0 {FLITE_F0_SCALE} x the voice's own, drawn uniformly per clip.
Audio: resampled to 16 kHz mono with soxr, leading/trailing frames quieter than -40 dB below
the loudest 10 ms frame trimmed (30 ms margin kept), written as 16-bit PCM WAV.
Split by voice: no voice (and no speaker, e.g. flite kal/kal16) is in both train and test.

Files: <split>/<word>/<voice>_<k>.wav; manifests train.tsv and test.tsv list
path<TAB>label<TAB>transcript<TAB>voice with paths relative to this folder.
Clips: train {stats["train_clips"]}, test {stats["test_clips"]} ({stats["failed_clips"]} failed).
Train voices ({len(voices["train"])}): {" ".join(voices["train"])}
Test voices ({len(voices["test"])}): {" ".join(voices["test"])}
Voices that failed and were skipped: {" ".join(stats["failed_voices"]) or "none"}
espeak-ng variants dropped as exact duplicates: {" ".join(stats["duplicate_voices"]) or "none"}
"""
    path.write_text(text, encoding="utf-8")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with an earlier corpus unless ``overwrite``."""
    ours = [out / n for n in ("train", "test", "train.tsv", "test.tsv", "README.txt")]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise DataError(
            f"{out} already holds a corpus ({', '.join(p.name for p in present)}); "
            "choose an empty folder or pass overwrite=True"
        )
    for p in present:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def synthesize_corpus(
    out: str | Path,
    words: Sequence[str] = DEFAULT_WORDS,
    seed: int = 0,
    jobs: int = 2,
    progress: bool = True,
    *,
    espeak_voices: int = 48,
    variants: int = 3,
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the spoken-word corpus under ``out`` (layout in the module docstring).

    With the defaults: 20 words x (48 espeak-ng + 5 flite voices) x 3 variants ≈ 3,200 clips.

    Args:
        out: Output folder (created).
        words: The words to speak; each is a label, a folder name and the transcript.
        seed: Picks the espeak-ng voices, the split and every clip's speed and pitch.
        jobs: Engine processes run at once.
        progress: Show progress bars.
        espeak_voices: espeak-ng voices to use (at most the number of distinct variants).
        variants: Clips per voice and word, each at its own random speed and pitch.
        test_fraction: Share of each engine's speakers held out for ``test``.
        overwrite: Replace a corpus already in ``out`` (only its own files are removed).

    Returns:
        ``train_clips``, ``test_clips``, ``train_voices``, ``test_voices`` (counts),
        ``failed_clips``, ``failed_voices`` and ``duplicate_voices`` (voice names),
        ``seconds`` (wall time), ``seed``, ``variants`` and ``words``.

    Raises:
        DataError: An engine is missing, espeak-ng has no usable voice, or ``out`` already holds
            a corpus.
        ValueError: Words repeat or are not letters, spaces and apostrophes; ``variants`` < 1.
    """
    start = time.perf_counter()
    bad = [w for w in words if not _WORD_RE.fullmatch(w)]
    if bad or not words or len(set(words)) != len(words):
        raise ValueError(
            f"words must be distinct, non-empty letters/spaces/apostrophes, got {list(words)}"
        )
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    _check_engines()
    out = Path(out)
    _prepare_out(out, overwrite)
    with tempfile.TemporaryDirectory(prefix="synth-speech-") as tmp_name:
        tmp = Path(tmp_name)
        voices, failed, duplicates = discover_voices(espeak_voices, seed, jobs, tmp, progress)
        split = split_voices(voices, test_fraction, seed)
        clips = _plan(voices, split, words, variants, seed)
        errors = _parallel(
            lambda c: _render(c, out, tmp), clips, jobs, "synthesize" if progress else None
        )
    made = [c for c, e in zip(clips, errors) if e is None]
    by_split = {s: [c for c in made if c.split == s] for s in ("train", "test")}
    for s, mine in by_split.items():
        _write_manifest(out / f"{s}.tsv", mine)
    names = {s: sorted({c.voice.name for c in mine}) for s, mine in by_split.items()}
    stats: dict[str, Any] = {
        "train_clips": len(by_split["train"]),
        "test_clips": len(by_split["test"]),
        "train_voices": len(names["train"]),
        "test_voices": len(names["test"]),
        "failed_clips": len(clips) - len(made),
        "failed_voices": failed,
        "duplicate_voices": duplicates,
        "seed": seed,
        "variants": variants,
        "words": list(words),
    }
    _write_readme(out / "README.txt", stats, names)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    log.info("synthetic speech corpus in %s: %s", out, stats)
    return stats
