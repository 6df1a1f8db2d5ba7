"""RunDir: the out dir of one training run, and the only code that writes in it.

    out_dir/
        .lock                    flock-ed for the run's life; names the holder (pid, host, start time)
        train_config.json        the run's TrainConfig
        train_log.jsonl          one JSON line per step, append-only (cut back, atomically, when a run resumes)
        checkpoints/step_NNNNNNN/   training/checkpoint.py; the newest `keep_checkpoints` of the run are kept
        model/ image_tokenizer/ text_tokenizer/   the exported pipeline (unif2ace.FacePipeline), each swapped in whole

An out dir belongs to one run. `open` takes the lock (a second process on the same dir is refused; the lock dies
with its process, so a killed run never leaves a stale one), removes what killed writers left, and then either
finds the checkpoint to resume from, or starts a fresh run — refused if the dir already holds a run, unless
`overwrite`, which first deletes that run's files. What survives a kill at any moment: every log line up to the
newest checkpoint, every complete checkpoint, and the previous complete pipeline. A write that fails for lack of
space or permission raises OSError naming the cause and the last good checkpoint.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import warnings
from typing import Optional

from unif2ace import durable
from unif2ace.model import checkpoint as model_checkpoint
from unif2ace.training import checkpoint

LOG = "train_log.jsonl"
CONFIG = "train_config.json"
LOCK = ".lock"
COMPONENTS = ("image_tokenizer", "text_tokenizer", "face_encoder")  # what a tokenizer dir may hold
PIPELINE = (*COMPONENTS, "model")  # swapped in this order: the model last
RUN_FILES = (LOG, CONFIG, "checkpoints", "model")           # any of these means the dir holds a run
_NOT_WRITABLE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EFBIG: "the file size limit is reached", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EROFS: "the file system is read-only"}


class RunDirError(RuntimeError):
    """The out dir cannot be used as asked: another process holds it, or it holds a run and neither resume nor
    overwrite was asked for."""


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self.last_checkpoint: Optional[str] = None
        self._lock = None
        self._log = None

    # ------------------------------------------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------------------------------------------
    def open(self, *, resume: bool, overwrite: bool = False, tokenizer_dir: str = "") -> Optional[tuple]:
        """Takes the out dir for this run. Returns the checkpoint to resume from as (path, model config, model
        state, trainer state), or None to start at step 0."""
        try:
            return self._open(resume, overwrite, tokenizer_dir)
        except BaseException:
            self.close()
            raise

    def _open(self, resume: bool, overwrite: bool, tokenizer_dir: str) -> Optional[tuple]:
        with self._writing("the out dir"):
            os.makedirs(self.path, exist_ok=True)
            self._take_lock()
            for folder in (self.path, os.path.join(self.path, "checkpoints")):
                for name in durable.remove_temporaries(folder):
                    warnings.warn(f"removed {os.path.join(folder, name)} left by an interrupted run")
            if resume:
                found = checkpoint.load_latest(self.path)
                self._set_aside_checkpoints_after(checkpoint.step_of(found[0]) if found else 0)
                self.last_checkpoint = found[0] if found else None
                return found
            held = [name for name in RUN_FILES if os.path.exists(os.path.join(self.path, name))]
            if held and not overwrite:
                raise RunDirError(f"{self.path} already holds a training run ({', '.join(held)}); pass --resume "
                                  f"to continue it, --overwrite to delete it and start again, or choose a new "
                                  f"--out-dir")
            if held:
                self._delete_run(tokenizer_dir)
            return None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_lock(self) -> None:
        self._lock = open(os.path.join(self.path, LOCK), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise RunDirError(f"{self.path} is in use by another training run ({holder}); wait for it to end or "
                              f"stop it, or choose another --out-dir") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        self._lock.flush()

    def _set_aside_checkpoints_after(self, step: int) -> None:
        """Checkpoints newer than the one resumed from failed to verify: they are renamed damaged-step_* (kept
        for inspection, never loaded or rotated) so this run's own checkpoints of those steps can take their
        place."""
        for path in checkpoint.list_checkpoints(self.path):
            if checkpoint.step_of(path) > step:
                aside = os.path.join(os.path.dirname(path), "damaged-" + os.path.basename(path))
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                warnings.warn(f"{path} could not be verified; renamed to {aside}")

    def _delete_run(self, tokenizer_dir: str) -> None:
        """Moves the old run's files into one temporary folder (a few renames: a kill leaves next to nothing of the
        old run in place, and the next open removes the folder), then deletes it. The tokenizers stay when the
        out dir is also the tokenizer dir (and so does the Face encoder there)."""
        keep_tokenizers = bool(tokenizer_dir) and os.path.isdir(tokenizer_dir) and os.path.samefile(tokenizer_dir,
                                                                                                     self.path)
        trash = durable.temporary_name(os.path.join(self.path, "overwritten"))
        os.makedirs(trash)
        for name in (LOG, CONFIG, "checkpoints", *PIPELINE):
            if os.path.lexists(os.path.join(self.path, name)) and not (keep_tokenizers and name in COMPONENTS):
                os.rename(os.path.join(self.path, name), os.path.join(trash, name))
        durable.fsync_path(self.path)
        shutil.rmtree(trash)

    # ------------------------------------------------------------------------------------------------------
    # Config and log
    # ------------------------------------------------------------------------------------------------------
    def save_config(self, config: dict) -> None:
        with self._writing(CONFIG):
            durable.write_file(os.path.join(self.path, CONFIG), json.dumps(config, indent=2) + "\n")

    def start_log(self, step: int) -> None:
        """Keeps the log lines of steps 1..step (atomically rewritten when that drops anything) and opens the log
        for appending."""
        path = os.path.join(self.path, LOG)
        kept, dropped = read_log(path, until=step)
        if dropped or not _ends_a_line(path):
            with self._writing(LOG):
                durable.write_file(path, "".join(json.dumps(r) + "\n" for r in kept))
        missing = sorted(set(range(1, step + 1)) - {r.get("step") for r in kept})
        if missing:
            warnings.warn(f"{path} has no lines for {len(missing)} step(s) up to the resumed step {step} "
                          f"(first: {missing[0]})")
        self._log = open(path, "a")

    def log(self, record: dict) -> None:
        with self._writing(LOG):
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints and export
    # ------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model_config: dict, model_state: dict, trainer_state: dict,
                        keep: int) -> str:
        """Writes checkpoint `step` (after the log lines it covers are on disk), then rotates."""
        with self._writing(f"checkpoint {step}"):
            if self._log is not None:
                self._log.flush()
                os.fsync(self._log.fileno())
            path = checkpoint.save(self.path, step, model_config, model_state, trainer_state)
        self.last_checkpoint = path
        checkpoint.rotate(self.path, keep, step)
        return path

    def export(self, model_config: dict, model_state: dict, image_tokenizer, text_tokenizer,
               face_encoder=None) -> None:
        """The pipeline folders, each written aside and swapped in whole: a kill leaves the previous export.
        `face_encoder`: a trained FaceAttributeEncoder the model was built with (written to face_encoder/)."""
        writers = {"image_tokenizer": image_tokenizer.save_pretrained, "text_tokenizer": text_tokenizer.save_pretrained,
                   "model": lambda d: model_checkpoint.write_files(d, model_config, model_state)}
        if face_encoder is not None:
            writers["face_encoder"] = face_encoder.save_pretrained
        with self._writing("the pipeline export"):
            for name in (n for n in PIPELINE if n in writers):
                with durable.staged_directory(os.path.join(self.path, name)) as tmp:
                    writers[name](tmp)

    def _writing(self, what: str):
        return _ReportWriteErrors(self, what)


class _ReportWriteErrors:
    """Turns a write that failed for lack of space or permission into an OSError that says so and names the last
    good checkpoint."""

    def __init__(self, run: RunDir, what: str):
        self.run, self.what = run, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        code = durable.errno_of(exc) if exc is not None and not isinstance(exc, RunDirError) else None
        if code not in _NOT_WRITABLE:
            return False
        last = self.run.last_checkpoint
        resume = (f"the last good checkpoint is {last}" if last else "no checkpoint of this run was written yet")
        raise OSError(code, f"{self.what} could not be written in {self.run.path}: {_NOT_WRITABLE[code]} "
                            f"({os.strerror(code)}); {resume}") from exc


def read_log(path: str, until: Optional[int] = None) -> tuple[list[dict], int]:
    """(records of train_log.jsonl with step <= until, number of lines dropped). A torn last line (a kill or a
    power loss during an append) or any unreadable line is dropped with a warning."""
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, dropped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise TypeError("step is not an int")
        except (ValueError, TypeError, KeyError):
            where = "its last line (torn by an interrupted write)" if i >= len(lines) - 2 else f"line {i + 1}"
            warnings.warn(f"{path}: dropped {where}, which is not a log record: {line[:80]!r}")
            dropped += 1
            continue
        if until is not None and step > until:
            dropped += 1
            continue
        records.append(record)
    return records, dropped


def _ends_a_line(path: str) -> bool:
    """Whether the file exists and is empty or ends with a newline (so an append starts a new line)."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
