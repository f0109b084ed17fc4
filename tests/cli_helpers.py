"""Run an entry point as a user would (a subprocess) and check how it fails on bad input.

    result = run_cli(["generate.py", "--steps", "0"])            # a script of the repo, or ["-m", "module", ...]
    assert_user_error(result, "--steps")                          # exit 2, one `error:` line naming it, no traceback
    with unchanged(tmp_path / "out"):                             # files that existed before are left as they were
        ...
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: Sequence[str], cwd: Path | None = None, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`python <args>` with a script path relative to the repo root (or `-m module`), output captured."""
    args = [str(a) for a in args]
    if args and not args[0].startswith("-"):
        args[0] = str(REPO / args[0])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full_env.pop("REMEDI_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and one `error: ...` line on stderr containing every fragment; returns it."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, f"exit {result.returncode}\n{output[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]
    return errors[0]


def in_process_user_error(main, argv: Sequence[str], capsys) -> str:
    """The one `error:` line (exit 2, no traceback) that run_main(main, argv) prints, run in this process (pytest's
    capsys fixture reads it)."""
    import pytest

    from remedi_patches.cli import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(main, list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exc.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _digest(root: Path) -> dict[str, str]:
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


@contextlib.contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Assert that every file under `paths` that existed before the block exists after it with the same bytes."""
    before = {p: _digest(p) for p in paths}
    yield
    for p, files in before.items():
        after = _digest(p)
        for name, digest in files.items():
            assert after.get(name) == digest, f"{p / name} was changed or removed"
