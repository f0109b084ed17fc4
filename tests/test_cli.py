"""remedi_patches.cli: parsers built from config dataclasses, and one-line user errors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from remedi_patches.cli import ArgumentParser, UserError, add_config_args, arg, config_from_args, run_main


@dataclass
class Toy:
    lr: float = arg(1e-4, "learning rate")
    steps: Optional[int] = arg(None, "steps", group="schedule")
    mode: str = arg("a", "mode", choices=("a", "b"))
    remask: bool = arg(True, "re-mask", flags=("--no_remask",))
    verbose: bool = arg(False, "talk")
    sources: list[str] = arg(["x", "y"], "sources")
    out: Path = arg(Path("out"), "folder", flags=("--out_dir", "--out"))
    internal: int = arg(3, "not a flag", cli=False)


def parse(argv):
    p = ArgumentParser(prog="toy")
    add_config_args(p, Toy, group="toy")
    return config_from_args(Toy, p.parse_args(argv))


def test_defaults_and_types_come_from_the_dataclass():
    assert parse([]) == Toy()
    cfg = parse(["--lr", "0.5", "--steps", "7", "--mode", "b", "--no_remask", "--verbose", "--sources", "z",
                 "--out", "o"])
    assert cfg == Toy(lr=0.5, steps=7, mode="b", remask=False, verbose=True, sources=["z"], out=Path("o"))
    assert Toy().sources is not Toy().sources  # list defaults are not shared


def test_help_lists_defaults_and_groups(capsys):
    p = ArgumentParser(prog="toy")
    add_config_args(p, Toy, group="toy")
    text = p.format_help()
    assert "schedule:" in text and "toy:" in text and "--internal" not in text
    assert "(default: 0.0001)" in text


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--mode", "c"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--mode" in err[0] and "toy --help" in err[0]


@pytest.mark.parametrize("exc", [UserError("bad\nthing; fix it"), ValueError("bad thing"),
                                 FileNotFoundError(2, "No such file or directory", "/nowhere")])
def test_run_main_turns_user_errors_into_one_line(capsys, exc):
    def main(argv=None):
        raise exc

    with pytest.raises(SystemExit) as info:
        run_main(main, [])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if isinstance(exc, FileNotFoundError):
        assert "/nowhere" in err[0]


def test_run_main_keeps_tracebacks_of_bugs():
    def main(argv=None):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_main(main, [])


# ---------------------------------------------------------------- run lock


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    import json
    import subprocess
    import sys

    from remedi_patches.run_lock import RunLock

    lock = RunLock(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.path.write_text(json.dumps({"pid": child.pid}))
        with pytest.raises(UserError, match=f"pid {child.pid}"):
            lock.acquire()
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path):  # the holder is gone: taken over, with a message
        assert json.loads(lock.path.read_text())["pid"] != child.pid
        with RunLock(tmp_path):  # re-entrant in one process
            pass
        assert lock.path.exists()
    assert not lock.path.exists()
    assert "stale lock" in capsys.readouterr().err
