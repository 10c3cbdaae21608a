"""Which offload code a run measured: a snapshot of the source, and fingerprints of it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import offload

SOURCE_DIR = Path(offload.__file__).resolve().parent  # the package being developed


def fingerprint(package_dir: Path = SOURCE_DIR) -> str:
    """A hash of every .py file of the package (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(str(path.relative_to(package_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def snapshot(dest: Path) -> Path:
    """Copy the package to dest/offload; returns dest, the directory to put on PYTHONPATH."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(SOURCE_DIR, dest / "offload", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def git_state(repo: Path) -> dict[str, str | bool]:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "--short", "HEAD") or "?",
        "src_dirty": bool(git("status", "--porcelain", "--", "src")),
    }
