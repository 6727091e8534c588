"""``data2vec demo --modality all``: every modality's demo in turn, one summary at the end.

Each demo runs as ``data2vec demo --modality M --out OUT/<modality>``, in a process of its own:
one demo's heap, threads and held data never slow the next (in one process the image demo's
2.8 GB left the speech demo on glibc's slower heap defaults), and each runs exactly as it
does alone. The checks that need no work (``--data``, the overrides against every
demo's preset) run before the first demo starts, so a typo fails in a second, not after the
image demo's 13 minutes. A demo that fails later is reported and the others still run: their
results are kept and the command exits non-zero at the end.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data2vec.config import load_config
from data2vec.errors import UserError

log = logging.getLogger("data2vec.demo")

# modality -> (pretraining minutes, output folder, data) of `data2vec demo --modality M`
DEFAULTS: dict[str, tuple[float, str, str | None]] = {
    "image": (7.0, "demo_out", "fashion-mnist"),
    "audio": (5.0, "demo_audio", None),
    # text needs ~1500 steps to pay off (configs/text-v2-tiny.yaml): 8 minutes here
    "text": (8.0, "demo_text", None),
    "signal": (4.0, "demo_signal", None),
}
ALL_OUT = "demo_all"


def presets() -> dict[str, str]:
    """The preset each modality's demo pretrains."""
    from data2vec import demo, demo_audio, demo_signal, demo_text

    modules = {"image": demo, "audio": demo_audio, "text": demo_text, "signal": demo_signal}
    return {modality: module.PRESET for modality, module in modules.items()}


def budgets(minutes: float | None) -> dict[str, float]:
    """Each demo's pretraining minutes: its own default, or a total of ``minutes`` shared in
    proportion to the defaults (7 : 5 : 8 : 4)."""
    if minutes is None:
        return {modality: default[0] for modality, default in DEFAULTS.items()}
    if minutes <= 0:
        raise UserError(f"--minutes {minutes:g}: the total pretraining budget must be > 0")
    total = sum(default[0] for default in DEFAULTS.values())
    return {modality: minutes * default[0] / total for modality, default in DEFAULTS.items()}


def check(data: str | None, overrides: list[str]) -> None:
    """Refuse what would fail later: a ``--data`` (it names one modality's data) and overrides
    that some demo's preset does not take."""
    if data is not None:
        raise UserError(
            f"--data {data}: with --modality all every demo uses its own default data; "
            "run one modality (--modality image|audio|text|signal) to give it data"
        )
    for modality, preset in presets().items():
        try:
            load_config(preset, overrides)
        except UserError as exc:
            raise UserError(f"{modality} demo ({preset}): {exc}") from exc


def run_in_process(modality: str, out: Path, minutes: float, overrides: list[str]) -> dict:
    """``data2vec demo --modality M`` in a child process; returns its ``results.json``.

    Raises:
        UserError: the child exited with 2 (it printed the reason).
        RuntimeError: any other non-zero exit.
    """
    command = [sys.executable, "-m", "data2vec.cli", "demo", "--modality", modality,
               "--out", str(out), "--minutes", repr(minutes), *overrides]  # fmt: skip
    code = subprocess.run(command, check=False).returncode
    if code == 2:
        raise UserError(f"data2vec demo --modality {modality} refused its input (see above)")
    if code != 0:
        raise RuntimeError(f"data2vec demo --modality {modality} exited with {code}")
    return json.loads((out / "results.json").read_text())


def run_all(
    out: Path,
    minutes: float | None,
    overrides: list[str],
    run_one: Callable[[str, Path, float, list[str]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run every demo with ``run_one`` (default :func:`run_in_process`) into
    ``out/<modality>``; write ``out/results.json`` and print one table.

    Raises:
        UserError: when only user errors failed demos (after the others ran); any other
            failure is raised as a ``RuntimeError`` naming the demos that failed.
    """
    run_one = run_one or run_in_process
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"modalities": {}, "failed": {}}
    failures: dict[str, Exception] = {}
    for i, (modality, budget) in enumerate(budgets(minutes).items(), 1):
        print(f"\n=== demo {i}/{len(DEFAULTS)}: {modality} ({budget:.3g} min) ===", flush=True)
        try:
            result = run_one(modality, out / modality, budget, list(overrides))
        except Exception as exc:  # one demo's failure must not throw away the others' work
            log.error("%s demo failed: %s", modality, exc)
            failures[modality] = exc
            summary["failed"][modality] = f"{type(exc).__name__}: {exc}"
            continue
        summary["modalities"][modality] = result
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print(table(summary))
    print(f"\nwrote {out / 'results.json'}; each demo's plots are in {out}/<modality>/")
    if failures:
        names = ", ".join(f"{m} ({summary['failed'][m]})" for m in failures)
        if all(isinstance(exc, UserError) for exc in failures.values()):
            raise UserError(f"demo failed for {names}; the others' results are in {out}")
        raise RuntimeError(f"demo failed for {names}; the others' results are in {out}")
    return summary


def table(summary: dict[str, Any]) -> str:
    """Every demo's rows (features, linear probe, kNN) under one header."""
    from data2vec.demo import TABLE_HEADER, table_row

    header = f"{'modality':<9}{TABLE_HEADER}"
    lines = [header, "-" * len(header)]
    for modality, result in summary["modalities"].items():
        lines += [f"{modality:<9}{table_row(name, r)}" for name, r in result["results"].items()]
    for modality, why in summary["failed"].items():
        lines.append(f"{modality:<9}failed: {why}")
    return "\n".join(lines)
