"""Atomic outputs: a crash never leaves a partial file or directory where a reader looks.

Every writer in the package (metrics and detections JSON, PNGs, figures, converted checkpoints, the
synthetic dataset, tfds metadata) goes through one of these: write beside the target on the same
filesystem, then `os.replace` / `os.rename` it into place; on any exception the temporary is removed.
Files that belong together (an evaluation's metrics.json and detections.json) go through `atomic_files`: none
replaces its target unless all of them were written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence


def default_file_mode() -> int:
    """0o666 minus the umask: what `open()` would give (mkstemp's temp files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yields a temporary file path beside `path` (parent directories created). When the block ends
    normally the file gets the usual mode and replaces `path`; when it raises, the file is removed."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike], suffix: str = "") -> Iterator[list[str]]:
    """`atomic_file` for several files that belong together: yields a temporary path beside each of `paths`. Only
    when the block ends normally do they replace their targets (in the order given); when it raises, e.g. while
    the last one is written, every target is left as it was and every temporary is removed."""
    with contextlib.ExitStack() as stack:
        # Exits run last-in first-out: entered in reverse, the files replace their targets in the order given (and
        # if one replace fails, the later ones see the exception and remove their temporaries).
        tmps = [stack.enter_context(atomic_file(p, suffix=suffix)) for p in reversed(list(paths))]
        yield tmps[::-1]


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: Optional[int] = None) -> None:
    """json.dump into a temp file beside `path`, then rename: readers never see a partial file."""
    with atomic_file(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


def remove_tree(path: str, settle_s: float = 0.3, limit_s: float = 10.0) -> None:
    """Removes the directory `path` and keeps removing it until it has stayed absent for `settle_s`: a storage
    library whose write just failed (orbax, TensorStore) may still have background writes in flight that
    recreate files in it. Gives up after `limit_s` (what is left is a temporary name no reader looks at)."""
    deadline = time.monotonic() + limit_s
    absent_since = None
    while time.monotonic() < deadline:
        if os.path.lexists(path):
            absent_since = None
            shutil.rmtree(path, ignore_errors=True)
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since >= settle_s:
            return
        time.sleep(0.05)


def atomic_directory(output: str, build: Callable[[str], Any], *, overwrite: bool = False) -> Any:
    """Runs `build(tmp_dir)` on a fresh directory beside `output`, then renames it to `output` and
    returns build's result. An existing `output` is replaced only with overwrite=True, and only after
    the new tree is complete (old tree renamed aside, new one renamed in, old one deleted)."""
    output = os.path.abspath(os.fspath(output))
    parent, name = os.path.split(output)
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        result = build(tmp)
        if os.path.exists(output):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
            os.rename(tmp, output)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file or a link replaced by the directory
                os.remove(old)
        else:
            os.rename(tmp, output)
    except BaseException:
        remove_tree(tmp)
        raise
    return result
