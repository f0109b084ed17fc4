"""Is a `--model` / `--dataset` value a local path or a Hugging Face hub name? One rule for every loader.

    resolve_source("GSAI-ML/LLaDA-8B-Base")   -> "GSAI-ML/LLaDA-8B-Base"   (hub name: str)
    resolve_source("./LLaDA-8B-Base")         -> Path(...)                 (local; FileNotFoundError if missing)

The rule: a value is a hub name only when it has the form `org/name` (exactly one slash, letters, digits, `-_.`)
and has no local meaning: it does not exist here, does not start with `.`, `/` or `~`, and its first component
(`org`) is not an existing local folder (so `runs/x`, with `runs/` present, is a missing local path, not a hub
repo). Everything else is a local path, and a missing one is reported as such, naming the path.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from typing import Union
from urllib.parse import urlparse

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
LOCAL_PREFIXES = (".", "/", "~")


def is_hub_name(name: Union[str, Path]) -> bool:
    """True when `name` is read as a hub name (see the module docstring); never true for a Path object."""
    if isinstance(name, Path):
        return False
    text = str(name)
    if text.startswith(LOCAL_PREFIXES) or not HUB_NAME.fullmatch(text):
        return False
    return not Path(text).exists() and not Path(text.split("/", 1)[0]).exists()


def missing_path_message(name: Union[str, Path], what: str = "model") -> str:
    text = str(name)
    path = Path(text).expanduser()
    where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
    message = f"{what} path {text!r} does not exist{where}"
    first = text.split("/", 1)[0]
    if "/" in text and HUB_NAME.fullmatch(text) and Path(first).exists():
        message += (f"; it is read as a local path because {first!r} exists here (a hub name org/name is used "
                    "only when org is not a local folder)")
    elif "/" not in text and not text.startswith(LOCAL_PREFIXES):
        message += "; it is not a hub name either (those look like org/name)"
    return message + ": check the path, or pass an existing local file or folder"


def resolve_source(name: Union[str, Path], what: str = "model") -> Union[str, Path]:
    """A hub name (str) or an existing local path (Path, `~` expanded); FileNotFoundError naming a missing path."""
    if is_hub_name(name):
        return str(name)
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(missing_path_message(name, what))
    return path


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint ($HF_ENDPOINT or huggingface.co) opens within `timeout` s.

    Loaders pass `local_files_only=True` when it does not, so a machine without network gets the hub message (or
    the cached copy) at once instead of after a minute of download retries. Behind a proxy (HTTPS_PROXY, ...) or
    with HF_HUB_OFFLINE set, nothing is probed (True / the libraries' own offline mode decide)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES) or os.environ.get("HF_HUB_OFFLINE"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unreachable_message(name: str, err: BaseException, what: str = "model") -> str:
    first_line = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (f"could not get {what} {name!r} from the Hugging Face hub (the hub is unreachable from this machine, "
            f"or there is no such repository or no access: {first_line}). If the {what} is on this machine, pass "
            f"its local folder instead (e.g. /models/{name.split('/')[-1]} or ./{name.split('/')[-1]}); otherwise "
            f"download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) and pass DIR")
