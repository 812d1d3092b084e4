"""Writing files and folders so that a crash never leaves a half-written one in place; OS errors in plain words."""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ATPError

# torch.save reports a failed write (in practice: a full disk) as a RuntimeError with these words
TORCH_WRITE_FAILED = ("enforce fail at inline_container.cc", "PytorchStreamWriter failed")
# temp and aside names of atomic_dir / atomic_file / write_text_atomic: .NAME.tmp-PID-XXXX, .NAME.old-PID; older
# atp versions wrote .NAME.tmp-XXXX and (GGUF files) .NAME.XXXX.tmp (no pid)
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:tmp-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}|[a-z0-9_]{8}\.tmp|old-(?P<old>\d+))$")


# safetensors reports a failed write as SafetensorError("Error while serializing: I/O error: ... (os error N)")
_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_torch_write_failure(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILED)


def safetensors_os_error(err: BaseException) -> OSError | None:
    """The OSError behind a safetensors SafetensorError (a full disk, a permission), else None."""
    if type(err).__name__ != "SafetensorError":
        return None
    match = _SAFETENSORS_OS_ERROR.search(str(err))
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return f"; {shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
            except OSError:
                return ""
    return ""


def _file_in_the_way(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            return folder
    return None


def describe_write_error(err: BaseException, path, what: str | None = None) -> str | None:
    """A plain message for an error raised while writing `path` (OSError, or torch's failed write), else None."""
    path = Path(path) if path is not None else None
    err = safetensors_os_error(err) or err
    if path is None:
        target = what or "a file"
    else:
        target = f"{what} to {path}" if what else str(path)
    if is_torch_write_failure(err) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
        return f"no space left on device while writing {target}{_free_space(path) if path else ''}"
    if not isinstance(err, OSError):
        return None
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted (an immutable file or folder?)",
               errno.EROFS: "read-only file system", errno.EISDIR: "it is a folder, not a file"}
    blocker = _file_in_the_way(path.parent) if path and err.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:  # mkdir(parents=True) under a file says "File exists" or "Not a directory"
        reason = f"{blocker} is a file, not a folder"
    elif err.errno == errno.ENOTDIR:
        reason = "a part of the path is a file, not a folder"
    else:
        reason = reasons.get(err.errno, err.strerror or str(err))
    return f"cannot write {target}: {reason}"


def as_write_error(err: BaseException, path, what: str | None = None) -> ATPError | None:
    message = describe_write_error(err, path, what)
    return ATPError(message) if message else None


@contextmanager
def writing(path, what: str | None = None):
    """Turn OS errors and torch's failed writes inside the block into an ATPError naming `path`."""
    try:
        yield
    except Exception as err:
        translated = as_write_error(err, path, what)
        if translated is None:
            raise
        raise translated from None


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder, only: str | None = None, depth: int = 2) -> list[Path]:
    """Remove temp folders and files that atomic writes of dead processes left behind in `folder` (and its
    subfolders, `depth` levels): `.NAME.tmp-PID-*` whose process is gone, and older atp's `.NAME.tmp-*`
    without a pid. An aside copy `.NAME.old-PID` of a dead process is moved back when NAME is missing
    (the process died between the two renames), else removed. `only`: just the temps of that NAME."""
    folder = Path(folder)
    removed = []
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            if depth > 1 and only is None and entry.is_dir() and not entry.is_symlink():
                removed += clean_stale_temps(entry, depth=depth - 1)
            continue
        if only is not None and match["name"] != only:
            continue
        pid = match["pid"] or match["old"]
        if pid is not None and alive(int(pid)):
            continue
        original = entry.with_name(match["name"])
        if match["old"] is not None and not original.exists():
            os.replace(entry, original)
            print(f"atp: restored {original} from {entry.name}, left by an interrupted write", file=sys.stderr)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        print(f"atp: removed {entry}, left by an interrupted write", file=sys.stderr)
    return removed


@contextmanager
def atomic_dir(target, what: str = "files"):
    """Yield a temp folder beside `target`. If the block succeeds, the folder takes target's place
    (an existing target is moved aside until then); if it fails, the temp folder is removed and target
    is untouched. OS errors (disk full, permissions) and torch's failed writes become an ATPError naming
    `what` and `target`. Temps that an earlier, killed process left for the same target are removed."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target.parent, only=target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as err:
        raise as_write_error(err, target, what) from None
    try:
        with writing(target, what):
            yield tmp
            os.chmod(tmp, 0o755)
            aside = None
            if target.exists():
                aside = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, aside)
            os.replace(tmp, target)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target, what: str | None = None):
    """Yield a temp file path beside `target` (`.NAME.tmp-PID-XXXXXXXX`) for a writer that opens paths itself; it
    replaces target only if the block succeeds, else it is removed. Temps that a killed process left for the same
    target are removed first; OS errors become an ATPError naming `what` and `target`."""
    target = Path(target)
    tmp = None
    try:
        with writing(target, what):
            target.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(target.parent, only=target.name)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-")
            os.close(fd)
            yield Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a result is as readable as any other
            os.replace(tmp, target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, data: str | bytes) -> None:
    """Write text (or bytes) through a temp file beside `path` and a rename; a failure leaves the old file
    as it was and becomes an ATPError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
            with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_writable_file(path, flag: str) -> Path:
    """Fail early (before hours of work) when a result file cannot be written: its folder is created and a
    temp file is written and removed there."""
    path = Path(path)
    if path.is_dir():
        raise ATPError(f"{flag} {path} is a folder; give a file name")
    with writing(path, f"{flag} file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
        os.close(fd)
        os.unlink(probe)
    return path


class DuplicateKey(Exception):
    pass


def _unique_key_loader():
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:  # the mapping's own keys; keys merged in with << may be overridden
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} appears a second time in "
                                       "the same mapping (YAML would silently keep only the last); keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_yaml_mapping(path, what: str, known) -> dict:
    """A YAML file holding a mapping whose keys are all in `known` (none twice in any mapping), or an ATPError
    naming `what`."""
    import yaml

    try:
        values = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
    except UnicodeDecodeError as err:
        raise ATPError(f"{what} {path} is not a YAML text file ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ATPError(f"{what} {path} is nested too deeply to read") from None
    except DuplicateKey as err:
        raise ATPError(f"{what} {path}, {err}") from None
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ATPError(f"could not read {what} {path}: {err}") from None
    if not isinstance(values, dict):
        raise ATPError(f"{what} {path} must hold a mapping of option: value")
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        raise ATPError(f"{what} {path} has unknown keys {unknown}; valid keys: {sorted(known)}")
    return values
