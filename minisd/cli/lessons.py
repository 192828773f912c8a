"""`minisd lesson N` and `minisd lessons`: run the chapter scripts in lessons/.

    minisd lesson 3                     # lessons/03_forward_noise.py, figures to ./figures/03_forward_noise/
    minisd lesson forward_noise --fast  # by name, quick sizes
    minisd lessons --out figures        # every lesson in order, each into figures/NN_name/
    minisd lessons --list               # what there is
    minisd lesson 4 --model checkpoints/mine   # lessons 4-8 with a model you trained

Each lesson runs as its own Python process (exactly as `python lessons/NN_name.py` would),
so one lesson's plots and settings never leak into the next. The scripts are found in
the checkout minisd was imported from (lessons/ beside minisd/), or, in an installed
package, in minisd/_lessons (shipped from lessons/ as package data).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import minisd
from minisd.cli import UsageError

# the package's folder, minisd/: lessons/ sits beside it in a checkout
_PACKAGE = Path(minisd.__file__).resolve().parent
_LESSON_RE = re.compile(r"^(\d\d)_(\w+)\.py$")


def lessons_dir() -> Path:
    """Where the lesson scripts are: lessons/ of a checkout, else the installed copy."""
    checkout = _PACKAGE.parent / "lessons"
    if checkout.is_dir() and any(_LESSON_RE.match(p.name) for p in checkout.iterdir()):
        return checkout
    installed = _PACKAGE / "_lessons"
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"the lesson scripts are missing (looked in {checkout} and {installed})")


def find_lessons() -> dict[int, Path]:
    """Lesson number -> script, in order."""
    found = {}
    for path in sorted(lessons_dir().iterdir()):
        match = _LESSON_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def resolve(which: str) -> Path:
    """A lesson by number ("3", "03") or name ("forward_noise", "03_forward_noise")."""
    lessons = find_lessons()
    key = which.strip().removesuffix(".py")
    if key.isdigit() and int(key) in lessons:
        return lessons[int(key)]
    for path in lessons.values():
        if key in (path.stem, path.stem[3:]):
            return path
    available = ", ".join(f"{n} ({p.stem[3:]})" for n, p in lessons.items())
    raise UsageError(f"minisd lesson: no lesson {which!r}; available: {available}")


def run_script(path: Path, out: Path | None = None, fast: bool = False, model: str | None = None) -> int:
    """Run one lesson script in a fresh Python; its output streams through. Returns its exit status."""
    command = [sys.executable, str(path)]
    if out is not None:
        command += ["--out", str(out)]
    if fast:
        command.append("--fast")
    if model is not None:
        command += ["--model", str(model)]
    env = dict(os.environ)
    # The script imports this very minisd, installed or not.
    package_root = str(_PACKAGE.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MPLBACKEND", "Agg")
    return subprocess.run(command, env=env).returncode


def _results(out: Path) -> dict:
    """The numbers a lesson wrote to OUT/results.json ({} if none)."""
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return {}


# ---- minisd lesson N ------------------------------------------------------------------


def add_lesson_arguments(parser) -> None:
    parser.add_argument("which", metavar="N", help="lesson number (0, 3, 03) or name (forward_noise)")
    parser.add_argument("--out", type=Path, help="folder for the figures (default: ./figures/NN_name/)")
    parser.add_argument("--fast", action="store_true", help="smaller and quicker (what CI runs)")
    parser.add_argument("--model", help="a trained model folder (default: the shipped model)")


def run_lesson(args) -> int:
    path = resolve(args.which)
    print(f"minisd lesson: {path}", flush=True)
    return run_script(path, args.out, args.fast, args.model)


# ---- minisd lessons --------------------------------------------------------------------


def add_lessons_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("figures"),
                        help="parent folder: each lesson writes into OUT/NN_name/ (default: ./figures)")
    parser.add_argument("--fast", action="store_true", help="smaller and quicker (what CI runs)")
    parser.add_argument("--model", help="a trained model folder (default: the shipped model)")
    parser.add_argument("--list", action="store_true", help="list the lessons and exit")


def run_lessons(args) -> int:
    lessons = find_lessons()
    if args.list:
        for n, path in lessons.items():
            print(f"{n:2d}  {path.stem}  ({path})")
        return 0
    timings, failed = [], []
    for n, path in lessons.items():
        print(f"\n##### lesson {n}: {path.stem} #####", flush=True)
        t0 = time.perf_counter()
        status = run_script(path, args.out / path.stem, args.fast, args.model)
        note = "ok" if status == 0 else f"FAILED (exit {status})"
        if status == 0 and _results(args.out / path.stem).get("model") is False:
            note = "skipped: it needs a trained model"
        timings.append((path.stem, time.perf_counter() - t0, note))
        if status:
            failed.append(path.stem)
    print("\nlessons:")
    for name, seconds, note in timings:
        print(f"  {name:<24} {seconds:6.1f} s  {note}")
    if failed:
        print(f"minisd lessons: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
