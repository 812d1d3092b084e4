"""Writing files and folders so that a crash never leaves a half-written one in place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ATPError


@contextmanager
def atomic_dir(target, what: str = "files"):
    """Yield a temp folder beside `target`. If the block succeeds, the folder takes target's place
    (an existing target is moved aside until then); if it fails, the temp folder is removed and target
    is untouched. OS errors (disk full, permissions) become an ATPError naming `what` and `target`."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise ATPError(f"cannot write {what} to {target}: {err}") from None
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o755)
            aside = None
            if target.exists():
                aside = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, aside)
            os.replace(tmp, target)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        except OSError as err:
            raise ATPError(f"cannot write {what} to {target}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path, data: str | bytes) -> None:
    """Write text (or bytes) through a temp file beside `path` and a rename; a failure leaves the old file
    as it was and becomes an ATPError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        raise ATPError(f"cannot write {path}: {err}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def read_yaml_mapping(path, what: str, known) -> dict:
    """A YAML file holding a mapping whose keys are all in `known`, or an ATPError naming `what`."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ATPError(f"could not read {what} {path}: {err}") from None
    if not isinstance(values, dict):
        raise ATPError(f"{what} {path} must hold a mapping of option: value")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ATPError(f"{what} {path} has unknown keys {unknown}; valid keys: {sorted(known)}")
    return values
