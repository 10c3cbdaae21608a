"""Bad input to the CLI: one line on stderr saying what is wrong, a non-zero exit, nothing written."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from acceptance_harness import APP, Harness, Result

# Every command that opens the store, with a broker URL appended.
OPENING_COMMANDS = [
    ("enqueue", "quick", "--args", "[1]", "--app", APP),
    ("queues",),
    ("dlq", "replay", "--all"),
    ("worker", APP, "--burst"),
    ("worker", APP, "--burst", "--processes", "2"),
]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` and a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def tables_and_rows(path: Path) -> list[object]:
    # Not mode=ro: a read-only connection to a WAL-mode file leaves -wal/-shm files behind.
    conn = sqlite3.connect(path)
    try:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        rows = conn.execute("SELECT * FROM users ORDER BY id").fetchall()
    finally:
        conn.close()
    return [schema, rows]


def make_foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    conn.executemany("INSERT INTO users (name) VALUES (?)", [("ada",), ("grace",)])
    conn.commit()
    conn.close()


def assert_one_line_error(result: Result, *needles: str) -> str:
    """One "error: ..." line on stderr that says one of `needles`, nothing on stdout, exit != 0."""
    lines = result.err.strip().splitlines()
    assert result.code != 0, result
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert any(needle in lines[0] for needle in needles), result
    assert result.out == "", result
    return lines[0]


@pytest.mark.timeout(180)
def test_cli_bad_input_gives_one_line_error_and_nonzero_exit(harness: Harness, tmp_path: Path) -> None:
    # The real store, with one job in it.
    ok = harness.run("enqueue", "quick", "--args", "[1]", "--app", APP)
    assert ok.code == 0 and len(ok.out.strip()) == 32, ok
    assert harness.stats()["ready"] == 1

    before = snapshot(tmp_path)
    bad_input = [
        (("enqueue", "nosuch", "--args", "[1]", "--app", APP), "no task named 'nosuch'"),
        (("enqueue", "quick", "--args", "[1,", "--app", APP), "--args is not valid JSON"),
        (("enqueue", "quick", "--args", '{"i": 1}', "--app", APP), "--args must be a JSON array"),
        (("enqueue", "quick", "--kwargs", "[1]", "--app", APP), "--kwargs must be a JSON object"),
        (("enqueue", "quick", "--args", "[1, 2]", "--app", APP), "cannot take these arguments"),
        (("enqueue", "quick", "--args", "[1]"), "needs your app"),
        (("worker", "no_such_module:app", "--burst"), "cannot import module 'no_such_module'"),
        (("worker", "acceptance_app:nope", "--burst", "--processes", "2"), "has no attribute 'nope'"),
    ]
    for args, needle in bad_input:
        print(assert_one_line_error(harness.run(*args, timeout=30), needle))
    assert snapshot(tmp_path) == before, "a rejected command changed a file"
    stats = harness.stats()
    assert (stats["ready"], stats["running"], stats["dead"]) == (1, 0, 0), stats

    scene = tmp_path / "scene"
    scene.mkdir()
    garbage = scene / "notes.bin"
    garbage.write_bytes(b"these are not the pages you are looking for\n" * 200)
    foreign = scene / "users.db"
    make_foreign_sqlite(foreign)
    foreign_content = tables_and_rows(foreign)
    targets = [
        (garbage, ("is not an SQLite database",)),
        (foreign, ("offload did not create (it holds tables users)",)),
        # (commands that only read say that there is no store there)
        (scene / "missing" / "offload.db", ("does not exist", "no offload store")),
    ]
    files = set(snapshot(scene))
    for path, needles in targets:
        for command in OPENING_COMMANDS:
            result = harness.run(*command, "--broker", f"sqlite:///{path}", timeout=30)
            print(assert_one_line_error(result, *needles))
            assert set(snapshot(scene)) == files, f"{command} created or removed a file"
            assert tables_and_rows(foreign) == foreign_content
    assert garbage.read_bytes() == b"these are not the pages you are looking for\n" * 200
    assert not (scene / "missing").exists()

    absent = scene / "absent.db"
    result = harness.run("queues", "--broker", f"sqlite:///{absent}")
    print(assert_one_line_error(result, "no offload store"))
    assert not absent.exists()


@pytest.mark.timeout(60)
def test_cli_leaves_a_foreign_sqlite_file_byte_for_byte_unchanged(harness: Harness, tmp_path: Path) -> None:
    foreign = tmp_path / "users.db"
    make_foreign_sqlite(foreign)
    before = foreign.read_bytes()
    assert_one_line_error(harness.run("queues", "--broker", f"sqlite:///{foreign}"), "did not create")
    assert foreign.read_bytes() == before
