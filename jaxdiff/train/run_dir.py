"""A training run's folder: the files that let it resume or be exported, each written whole or not
at all (a temporary file or folder beside it, then a rename), so a kill at any moment leaves a run
that resumes.

  config.json          the full config of the run
  pipeline.json        the config dicts of the pipeline being trained (diffusers config dicts); its
                       presence marks a started run
  tokenizer*/          its tokenizers
  checkpoints/         Orbax checkpoints of the TrainState (train.checkpoint)
  metrics.csv          scalars per logged step, one row per step across resumes
  samples/             images at intervals
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import tempfile

import ml_collections

from jaxdiff import components
from jaxdiff.train import checkpoint as checkpoint_lib
from jaxdiff.weights import folder

RUN_CONFIG, RUN_PIPELINE = "config.json", "pipeline.json"
CHECKPOINTS = "checkpoints"
_TMP_PREFIX = ".jaxdiff-tmp-"  # temporary files and folders in a run directory, renamed when whole


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` whole or not at all: a temporary file beside it, synced, then renamed
    over it (a process killed at any moment leaves the old file or the new one, never a part)."""
    folder_, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder_, prefix=f"{_TMP_PREFIX}{name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_folder_atomically(path: str, write) -> None:
    """`write(folder)` into a temporary folder beside `path`, then renamed to `path` (replacing it)."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{_TMP_PREFIX}{name}.")
    try:
        write(tmp)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_run_files(workdir, config, model_configs, tokenizers):
    """config.json, the tokenizers, then pipeline.json (whose presence marks a started run), each
    written whole or not at all; leftovers of a start that was killed are removed first."""
    os.makedirs(workdir, exist_ok=True)
    for name in os.listdir(workdir):
        if name.startswith(_TMP_PREFIX):
            leftover = os.path.join(workdir, name)
            shutil.rmtree(leftover) if os.path.isdir(leftover) else os.remove(leftover)
    write_atomically(os.path.join(workdir, RUN_CONFIG), config.to_json_best_effort(indent=2))
    for tok, (_, name) in zip(tokenizers, folder.TEXT_COMPONENTS):
        _write_folder_atomically(os.path.join(workdir, name), tok.save_pretrained)
    write_atomically(os.path.join(workdir, RUN_PIPELINE), json.dumps(dataclasses.asdict(model_configs), indent=2))


def _read_run_json(path: str) -> dict:
    """A run file's JSON object; a ValueError naming the file when it is empty, cut short or not an object."""
    raw = b""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, OSError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        if isinstance(e, FileNotFoundError):
            raise ValueError(f"{path} is missing (a run killed while starting?)") from None
        what = "is empty" if isinstance(e, ValueError) and not raw.strip() else "is corrupt"
        raise ValueError(f"{path} {what} (a run killed while starting?): {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is corrupt: a JSON {type(value).__name__}, not an object")
    return value


def read_run(workdir: str):
    """(config, model_configs, tokenizers) of an existing run directory; FileNotFoundError when `workdir`
    is no run directory, a ValueError naming the file when one of its files cannot be read."""
    from transformers import CLIPTokenizer

    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a jaxdiff run directory (no {RUN_CONFIG})")
    config = ml_collections.ConfigDict(_read_run_json(path))
    path = os.path.join(workdir, RUN_PIPELINE)
    raw = _read_run_json(path)
    try:
        model_configs = components.PipelineConfigs(**{**raw, "text_encoders": tuple(raw["text_encoders"])})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is corrupt: not the configs of a pipeline ({type(e).__name__}: {e})") from None
    tokenizers = []
    for _, name in folder.TEXT_COMPONENTS[:len(model_configs.text_encoders)]:
        try:
            tokenizers.append(CLIPTokenizer.from_pretrained(os.path.join(workdir, name)))
        except (OSError, ValueError, TypeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"{os.path.join(workdir, name)} cannot be read as a tokenizer "
                             f"(a run killed while starting?): {reason}") from None
    return config, model_configs, tokenizers


def existing_run_configs(workdir: str):
    """The pipeline configs (`PipelineConfigs`) of the run already in `workdir`, or None when there is none to resume.

    Run files that cannot be read (a run of an older version killed while writing them) are written
    afresh when no checkpoint needs them (with a warning); with checkpoints it is an error naming the file.
    """
    if not os.path.exists(os.path.join(workdir, RUN_PIPELINE)):
        return None
    try:
        return read_run(workdir)[1]
    except (ValueError, FileNotFoundError) as e:
        steps = checkpoint_lib.saved_steps(os.path.join(workdir, CHECKPOINTS))
        if steps:
            raise ValueError(f"{e}; the checkpoints of {workdir} (steps {', '.join(map(str, steps))}) need "
                             "it: restore it, or delete the folder to start the run over") from None
        logging.warning("%s; %s has no checkpoint yet, so its run files are written afresh", e, workdir)
        return None


class MetricsLog:
    """Appends scalars to `metrics.csv` (one row per logged step, columns fixed by the first).

    `keep_until(step)` (a resume) drops the rows after `step`, which the run is about to write again,
    and any row a kill cut short, so the file keeps one row per step however often the run stopped.
    """

    def __init__(self, path: str):
        self.path = path
        self.fields = None

    def keep_until(self, step: int) -> None:
        """Drops the rows of steps after `step` (and cut-short or unreadable lines), rewriting the
        file atomically; removes it when no row is left."""
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            lines = f.readlines()
        header = next(csv.reader(lines[:1]), None) if lines and lines[0].endswith("\n") else None
        kept = []
        for line in lines[1:] if header else ():
            row = next(csv.reader([line]), [])
            if not line.endswith("\n") or len(row) != len(header):
                continue  # cut short by a kill while it was written
            try:
                if int(row[0]) <= step:
                    kept.append(line)
            except ValueError:
                continue
        self.fields = None
        if not kept:
            os.remove(self.path)
        elif len(kept) != len(lines) - 1:
            write_atomically(self.path, "".join(lines[:1] + kept))

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        new = not os.path.exists(self.path)
        if self.fields is None:
            if new:
                self.fields = list(row)
            else:
                with open(self.path, newline="") as f:
                    self.fields = next(csv.reader(f))
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
