"""Atomic file output: a reader never sees a half-written results file, map or checkpoint.
See docs/architecture-core.md."""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from eamvit.errors import EamError

TMP_TAG = ".eamvit-tmp-"
LOCK_TAG = ".eamvit-lock"
_counter = itertools.count()


def nearest_existing(path: str | os.PathLike) -> Path:
    """The deepest existing ancestor of ``path`` (``path`` itself when it exists)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse an output file path that cannot be written (named by ``option``), creating nothing."""
    text = str(path)
    if not text.strip():
        raise EamError(f"{option} is empty; give a file name")
    p = Path(text)
    if text.endswith(os.sep) or p.is_dir():
        raise EamError(f"{option} {p} is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise EamError(f"{option} {p} is read-only; choose another file")
    return _under_writable_folder(p, nearest_existing(p.parent if str(p.parent) else "."), option)


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be made or written, without creating anything."""
    text = str(path)
    if not text.strip():
        raise EamError(f"{option} is empty; give a folder name")
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise EamError(f"{option} {p} is a file, not a folder")
    return _under_writable_folder(p, nearest_existing(p), option)


def _under_writable_folder(p: Path, base: Path, option: str) -> Path:
    """``p``, once its nearest existing ancestor ``base`` is a folder this process can write into."""
    if not base.is_dir():
        raise EamError(f"{option} {p}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise EamError(f"{option} {p}: folder {base} is not writable; choose a writable {option}")
    return p


# Folders this process created for its outputs, so that a failed command can remove the ones it left empty.
_CREATED: list[Path] = []


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) or fail with a clear message; remove what killed runs left in it
    (:func:`clean_stale_temporaries`). The folders created are remembered for :func:`remove_created_dirs`."""
    p = Path(path)
    full, base = Path(os.path.abspath(p)), nearest_existing(p)
    missing = [q for q in (full, *full.parents) if len(q.parts) > len(base.parts)]
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise EamError(f"output folder {p} is a file; choose another --out") from None
    except OSError as e:
        raise EamError(f"cannot create output folder {p}: {e.strerror}; choose a writable --out") from None
    _CREATED.extend(d for d in missing if d.is_dir())
    if not os.access(p, os.W_OK):
        raise EamError(f"output folder {p} is not writable; choose a writable --out")
    clean_stale_temporaries(p)
    return p


def remove_created_dirs(keep: bool = False) -> None:
    """Remove the folders :func:`ensure_writable_dir` created that are still empty, and forget them: a
    refused or interrupted command leaves no empty output folder behind. ``keep`` (the command
    succeeded) only forgets them."""
    for d in [] if keep else sorted(set(_CREATED), key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()  # only an empty folder; one the run filled stays
    _CREATED.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner_pid(entry: Path) -> int | None:
    """The process a hidden temporary (pid in its name) or lock (pid as its content) belongs to."""
    if not entry.name.startswith("."):
        return None
    if entry.name.endswith(LOCK_TAG):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = entry.read_text().strip()  # empty while its writer is between creating and writing it
            return int(text) if text.isdigit() else None
        return None
    tail = entry.name.rsplit(TMP_TAG, 1)[-1] if TMP_TAG in entry.name else ""
    pid = tail.split("-")[0]
    return int(pid) if pid.isdigit() else None


def clean_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove the ``.*.eamvit-tmp-<pid>*`` temporaries and ``.*.eamvit-lock`` locks of ``folder``
    whose process is gone (a run killed with -9 leaves both)."""
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            pid = _owner_pid(entry)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _os_error(e: OSError, target: Path) -> EamError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return EamError(f"disk full while writing {target}; nothing was written, free space on that disk "
                        "or choose another --out")
    return EamError(f"cannot write {target}: {e.strerror or e}; choose a writable --out")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path with the target's name, in a hidden folder ``.<name>.eamvit-tmp-<pid>-<n>``
    next to the target; rename it over ``path`` only on success. The folder goes either way."""
    target = Path(path)
    folder = ensure_writable_dir(target.parent if str(target.parent) else ".")  # also removes stale temporaries
    tmp_dir = folder / f".{target.name}{TMP_TAG}{os.getpid()}-{next(_counter)}"
    try:
        tmp_dir.mkdir()
        tmp = tmp_dir / target.name
        yield tmp
        if not tmp.exists():
            raise EamError(f"nothing was written to {target}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # results are for sharing
        os.replace(tmp, target)
    except OSError as e:
        raise _os_error(e, target) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    """The one place file contents are written (tests make it fail as a full disk would)."""
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        _write(tmp, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rows with possibly different keys; the header is the union in first-seen order."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def results_paths(stem: str | os.PathLike) -> tuple[Path, Path]:
    """``STEM.csv`` and ``STEM.json``: the suffixes are appended to the whole stem (``eval_0.2`` ->
    ``eval_0.2.csv``); a stem already ending in ``.csv`` or ``.json`` loses that ending first."""
    text = str(stem)
    for ext in (".csv", ".json"):
        if text.endswith(ext):
            text = text[: -len(ext)]
    return Path(text + ".csv"), Path(text + ".json")


def write_results(stem: str | os.PathLike, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``stem.csv`` and ``stem.json`` with the same rows (see :func:`results_paths`)."""
    csv_path, json_path = results_paths(stem)
    write_csv(csv_path, rows)
    write_json(json_path, list(rows))
    return csv_path, json_path


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``.<name>.eamvit-lock`` next to ``path`` for the whole run: a second run writing the same
    output fails instead of overwriting it (see docs/architecture-core.md)."""
    target = Path(path)
    folder = ensure_writable_dir(target.parent if str(target.parent) else ".")
    lock = folder / f".{target.name}{LOCK_TAG}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _owner_pid(lock)
            if pid and not _pid_alive(pid):  # its run was killed: taken over
                with contextlib.suppress(OSError):
                    lock.unlink()
                continue
            who = f"another eamvit run (pid {pid})" if pid else "another eamvit run"
            raise EamError(f"{who} is writing {target} (lock {lock}); wait for it or choose another --out") from None
        except OSError as e:
            raise _os_error(e, lock) from None
    else:
        raise EamError(f"cannot take the lock {lock}; remove it if no eamvit run is writing {target}")
    try:
        os.write(fd, str(os.getpid()).encode())
    except OSError as e:  # a full disk: no lock is left on it
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()
        raise _os_error(e, target) from None
    os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


DIGEST_KEY = "eamvit_sha256"


def tensors_sha256(tensors: dict, meta: Optional[dict] = None) -> str:
    """SHA-256 of ``tensors`` (name, dtype, shape and bytes of each, by name) and of the JSON-ready
    ``meta`` as canonical JSON (sorted keys, no spaces)."""
    import torch

    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict, meta: dict) -> None:
    """Atomically write ``tensors`` as safetensors with ``meta`` as JSON metadata and the digest that
    lets :func:`load_tensors` refuse a file changed after it was written."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(meta)
    digest = tensors_sha256(tensors, json.loads(text))  # the metadata as a reader will see it
    # Serialised in memory and written by _write: a full disk is an OSError we can name.
    write_bytes(path, save(tensors, metadata={"eamvit": text, DIGEST_KEY: digest}))


def load_tensors(path: str | os.PathLike, fmt: str | Sequence[str], what: str, remedy: str) -> tuple[dict, dict]:
    """``(meta, tensors)`` of a file :func:`save_tensors` wrote, refused unless its digest (eamvit 0.2
    wrote none) matches and its ``meta["format"]`` is ``fmt`` (or one of several); ``what`` it is (e.g.
    ``"entropy maps"``) and the ``remedy`` (e.g. ``"compute them with `eamvit calibrate`"``) go in messages."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        raise EamError(f"{what} {p} is a folder, not a file; {remedy}")
    if not p.is_file():
        raise EamError(f"{what} {p} do not exist; {remedy}" if what.endswith("s") else
                       f"{what} {p} does not exist; {remedy}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            meta = json.loads(header.get("eamvit", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EamError(f"cannot read {what} {p} ({type(e).__name__}); {remedy}") from None
    if not isinstance(meta, dict) or meta.get("format") not in ((fmt,) if isinstance(fmt, str) else tuple(fmt)):
        raise EamError(f"{p} is not an eamvit {what} file; {remedy}")
    stored = header.get(DIGEST_KEY)
    if stored is None:
        raise EamError(f"{what} {p} has no digest (written by eamvit 0.2 or earlier), so it cannot be checked; "
                       f"re-create it: {remedy}")
    if stored != tensors_sha256(tensors, meta):
        raise EamError(f"{p} was modified after eamvit wrote it (digest mismatch); re-create it: {remedy}")
    return meta, tensors
