"""Who owns an output: a run folder is locked by the live process that writes it, no command writes inside its
own inputs, and `--overwrite` replaces only what atp made, keeping an earlier finished run until the new one
has exported."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import ATPError
from .fsutil import alive, as_write_error, clean_stale_temps, write_text_atomic

LOCK_NAME = ".atp-lock"
RUN_OUTPUTS = ("log.jsonl", "decisions.jsonl", "report.json", "config.yaml", "checkpoints", "model")
UNFINISHED = {"config.yaml", "log.jsonl", "decisions.jsonl"}  # all that a run which never reached a checkpoint leaves
ASIDE = ".replaced-run-"  # OUT/.replaced-run-PID: the earlier run's outputs while a new run replaces them
_HELD: dict[Path, list] = {}  # folder -> [open lock file, holders in this process, whether the lock made it]


def check_out_path(path, flag: str = "--out") -> Path:
    """Refuse an empty output path (an unset variable) and a filesystem root or home folder."""
    text = str(path) if path is not None else ""
    if not text.strip():
        raise ATPError(f"{flag} is empty; give the folder or file to write (was a variable unset?)")
    resolved = Path(text).expanduser().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise ATPError(f"{flag} {text} is {resolved}, a root or home folder; give a folder of its own for atp's "
                       "outputs")
    return Path(text)


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_inside_inputs(out, inputs: dict, flag: str = "--out") -> None:
    """Refuse an output that is, holds or lies inside one of the command's inputs ({flag: path}; paths that do not
    exist locally, such as hub ids, are skipped)."""
    target = Path(out).expanduser().resolve()
    for name, value in inputs.items():
        if value is None or str(value) == "" or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        if _inside(target, source) or _inside(source, target):
            where = "is" if target == source else "lies inside" if _inside(target, source) else "holds"
            raise ATPError(f"{flag} {out} {where} the {name} {value}: atp never writes over its own inputs; "
                           f"choose another {flag}")


def check_output_file(path, flag: str, *, overwrite: bool, inputs: dict | None = None) -> Path:
    """A result file a command will write (JSON): not over its inputs, not replacing an existing file without
    --overwrite, and only ever replacing a JSON file (what atp writes), never a model's weights or a data file."""
    from .fsutil import check_writable_file

    path = check_out_path(path, flag)
    check_not_inside_inputs(path, inputs or {}, flag)
    if path.is_file():
        if not overwrite:
            raise ATPError(f"{flag} {path} already exists; pass --overwrite to replace it")
        import json

        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise ATPError(f"{flag} {path} exists and is not a JSON results file; --overwrite replaces only "
                           "results atp wrote, so choose another path") from None
    return check_writable_file(path, flag)


# ----------------------------------------------------------------------------- the lock


def _lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def acquire(folder, what: str = "run") -> None:
    """Lock `folder` for this process (re-entrant): an flock on FOLDER/.atp-lock, which holds the PID. Another live
    process holding it is refused; a lock left by a dead process is free, since the kernel drops it."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise as_write_error(err, folder) or err from None
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path = key / LOCK_NAME
    while True:
        try:
            handle = open(path, "a+")
        except OSError as err:
            raise as_write_error(err, path, "the lock file") or err from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            pid = _lock_pid(path)
            holder = f"process {pid}" if pid is not None and alive(pid) else "another process"
            raise ATPError(f"{folder} is in use by another atp {holder}; wait for it to finish, or choose another "
                           "--out") from None
        try:  # the file may have been removed (released) between our open and our lock: then lock the new one
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[key] = [handle, 1, created]


def release(folder) -> None:
    key = Path(folder).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    handle, _, created = _HELD.pop(key)
    try:
        os.unlink(key / LOCK_NAME)  # while still locked, so no one else holds a lock on this file
    except OSError:
        pass
    handle.close()
    if created:
        try:
            key.rmdir()  # the lock made the folder, and nothing else was written there
        except OSError:
            pass


@contextmanager
def locked(folder, what: str = "run"):
    acquire(folder, what)
    try:
        yield
    finally:
        release(folder)


# ----------------------------------------------------------------------------- replacing an earlier run


def is_atp_run(path) -> bool:
    """Whether `path` holds a run atp made: a config.yaml whose keys are all `atp prune` options."""
    import yaml

    from .config import RecipeOptions, upgrade_record
    from .kinds import OPTION_MIXINS

    try:
        values = yaml.safe_load((Path(path) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(values, dict) or not values:
        return False
    import dataclasses

    known = {f.name for part in (RecipeOptions, *OPTION_MIXINS) for f in dataclasses.fields(part)}  # ATPConfig's
    return set(upgrade_record(values)) <= known


def _made_by_atp(path: Path, made: list[str]) -> bool:
    """Whether the run outputs found in `path` are atp's: beside an atp config.yaml, or the logs alone (what a run
    killed before writing its config left, in older versions)."""
    import json

    if "config.yaml" in made:
        return is_atp_run(path)
    if not set(made) <= {"log.jsonl", "decisions.jsonl"}:
        return False
    if "log.jsonl" not in made:
        return True
    try:
        with open(path / "log.jsonl", encoding="utf-8") as f:
            first = f.readline()
        return not first.strip() or "step" in json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def _asides(path: Path) -> list[Path]:
    return sorted(path.glob(ASIDE + "*")) if path.is_dir() else []


def _aside_pid(aside: Path) -> int | None:
    pid = aside.name[len(ASIDE):]
    return int(pid) if pid.isdigit() else None


def _has_checkpoint(path: Path) -> bool:
    return any((path / "checkpoints").glob("step-*"))


class RunOutputs:
    """The outputs of a new run in cfg.out. `check` (before any work) refuses a folder that holds a run without
    --overwrite, and outputs atp did not make even with it; `start` (every input checked) moves the earlier outputs
    into OUT/.replaced-run-PID and writes config.yaml; `checkpointed` (the first checkpoint) makes the new run
    resumable; `finish` (the export and report exist) deletes the earlier outputs. `undo` (a failure): before a
    checkpoint, the new outputs are removed and the earlier ones moved back; after one, the new run stays
    resumable and the earlier run stays aside until a run in OUT finishes. Files of the user's stay."""

    def __init__(self, cfg):
        self.cfg, self.path = cfg, Path(cfg.out)
        self.aside, self.started, self.kept = None, False, False

    def check(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise ATPError(f"output path {path} is a file; --out takes a directory")
        restore_interrupted(path)
        clean_stale_temps(path)
        busy = [a for a in _asides(path) if _aside_pid(a) not in (None, os.getpid()) and alive(_aside_pid(a))]
        if busy:
            raise ATPError(f"another atp run (process {_aside_pid(busy[0])}) is replacing the run in {path}; "
                           "wait for it, or choose another --out")
        names = ({p.name for p in path.iterdir()} - {LOCK_NAME} - {a.name for a in _asides(path)}
                 if path.is_dir() else set())
        made = [name for name in RUN_OUTPUTS if name in names]
        if made and not _made_by_atp(path, made):
            raise ATPError(f"{path} holds {', '.join(made)}, which no atp run made (no atp config.yaml there); atp "
                           "replaces only its own runs, so choose another --out")
        if names and not self.cfg.overwrite:
            if not names <= UNFINISHED:
                raise ATPError(f"output directory {path} already exists and is not empty; pass --overwrite to "
                               "replace it")
            print(f"atp: note: replacing {', '.join(sorted(names))} in {path}, left by a run that stopped before "
                  "its first checkpoint", file=sys.stderr)

    def start(self, config: dict) -> None:
        path = self.path
        found = [name for name in RUN_OUTPUTS if (path / name).exists() or (path / name).is_symlink()]
        kept = _asides(path)  # an earlier finished run kept aside (no live run has one: we hold the lock)
        if kept and (path / "report.json").exists():  # the outputs here finished after all: they are the earlier run
            for aside in kept:
                shutil.rmtree(aside, ignore_errors=True)
            kept = []
        if kept:  # the outputs here are an unfinished run that replaced the kept one: it is what --overwrite replaces
            _remove_outputs(path)
            self.aside = path / f"{ASIDE}{os.getpid()}"
            if kept[0] != self.aside:
                os.replace(kept[0], self.aside)
        elif found:
            self.aside = path / f"{ASIDE}{os.getpid()}"
            self.aside.mkdir()
            try:
                for name in found:
                    os.replace(path / name, self.aside / name)
            except OSError:
                _move_back(self.aside, path)
                self.aside = None
                raise
        path.mkdir(parents=True, exist_ok=True)
        self.started = True
        write_text_atomic(path / "config.yaml", _yaml(config))

    def checkpointed(self) -> None:
        self.kept = True

    def finish(self) -> None:
        self.kept = True
        discard_replaced(self.path)
        self.aside = None

    def undo(self) -> None:
        if not self.started:
            return
        if self.kept:
            if self.aside is not None and self.aside.exists():
                print(f"atp: the earlier run in {self.path} is kept in {self.aside} until a run there finishes; "
                      f"`atp prune --resume {self.path}` continues this one", file=sys.stderr)
            return
        self.started = False
        try:
            _remove_outputs(self.path)
            if self.aside is not None:
                _move_back(self.aside, self.path)
                print(f"atp: the earlier run in {self.path} is as it was (the new run stopped before its first "
                      "checkpoint)", file=sys.stderr)
        except OSError as err:  # the error that stopped the run matters more; the next run restores it
            print(f"atp: warning: could not put back the earlier run in {self.path}: {err}", file=sys.stderr)


def discard_replaced(path) -> None:
    """A run in `path` has exported: the earlier runs kept aside go."""
    for aside in _asides(Path(path)):
        pid = _aside_pid(aside)
        if pid is None or pid == os.getpid() or not alive(pid):
            shutil.rmtree(aside, ignore_errors=True)


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def _remove_outputs(path: Path) -> None:
    for name in RUN_OUTPUTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _move_back(aside: Path, path: Path) -> None:
    for entry in aside.iterdir():
        os.replace(entry, path / entry.name)
    aside.rmdir()


def restore_interrupted(path) -> None:
    """A run killed while it replaced an earlier one left OUT/.replaced-run-PID: if it saved no checkpoint, the
    earlier run is moved back (its own outputs removed); if it did, the earlier run stays aside until a run in OUT
    finishes, unless that already happened (a report is there), when it goes."""
    path = Path(path)
    for aside in _asides(path):
        pid = _aside_pid(aside)
        if pid is None or alive(pid):
            continue
        if _has_checkpoint(path):
            if (path / "report.json").exists():
                shutil.rmtree(aside, ignore_errors=True)
            continue
        _remove_outputs(path)
        _move_back(aside, path)
        print(f"atp: restored the run in {path} that an interrupted run (process {pid}) was replacing",
              file=sys.stderr)
