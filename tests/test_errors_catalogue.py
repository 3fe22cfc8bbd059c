"""The bad-input catalogue docs/errors.md, run entry by entry.

Each table row of docs/errors.md (``| E.. | `robustft ...` | ``message`` |``) is one test:
the command runs in-process against a scratch folder ``{sb}`` built once for the module,
and must exit with code 2, print exactly the documented one-line error (or its beginning
when the documented text ends in "…") as the last line of stderr, print no traceback, and
leave the scratch folder exactly as it was (no new files or folders, none changed).

After changing an error message on purpose, refresh the page with
``.venv/bin/python tests/test_errors_catalogue.py --update`` and review the diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustft.cli import main
from robustft.data import testing as fake
from robustft.model import ClassifierHead, ImageClassifier, load_classnames, load_clip, save_classifier
from robustft.reports.results import ResultRow, append_rows
from robustft.safeio import load_tensors, save_tensors

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ELLIPSIS = "…"
_ROW = re.compile(r"^\|\s*(E\d+)\s*\|")
_ERROR_LINE = re.compile(r"^robustft( [a-z][a-z-]*)*: error: ")
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")


@dataclass(frozen=True)
class Entry:
    """One catalogue row: the command (with ``{sb}``) and the documented error line."""

    id: str
    command: str
    message: str

    @property
    def prefix_only(self) -> bool:
        return self.message.endswith(ELLIPSIS)

    def argv(self, sb: Path) -> list[str]:
        words = shlex.split(self.command.replace("{sb}", str(sb)))
        assert words[0] == "robustft", f"{self.id}: a command starts with 'robustft'"
        return words[1:]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    for tick in ("``", "`"):
        if cell.startswith(tick) and cell.endswith(tick) and len(cell) >= 2 * len(tick):
            return cell[len(tick) : -len(tick)].strip()
    return cell


def _cells(line: str) -> list[str]:
    cells = [c for c in line.strip().strip("|").split(" | ")]
    if len(cells) != 3:
        raise ValueError(f"docs/errors.md: a catalogue row needs 3 cells (id | command | message): {line!r}")
    return cells


def read_entries(doc: Path = DOC) -> list[Entry]:
    """Every catalogue row of ``doc``, in page order."""
    entries = []
    for line in doc.read_text(encoding="utf-8").splitlines():
        if _ROW.match(line):
            ident, command, message = (_unquote(c) for c in _cells(line))
            entries.append(Entry(ident, command, message))
    return entries


# ----------------------------------------------------------------------------- the scratch folder
def _classifier_copy(sb: Path, name: str) -> Path:
    shutil.copytree(sb / "zs", sb / name)
    return sb / name / "classifier.safetensors"


def _zeroshot(sb: Path, names: str, out: str) -> None:
    assert main(["zeroshot", "--model", "robustft-tiny", "--pretrained", "none", "--classnames", str(sb / names),
                 "--templates", "simple", "--out", str(sb / out), "--no-progress"]) == 0


def _imagenet_head_run(out: Path) -> None:
    """A robustft-tiny classifier over the 1000 ImageNet names (random head: no text encoding)."""
    bundle = load_clip("robustft-tiny", "none")
    weights = F.normalize(torch.randn(1000, bundle.model.visual.output_dim), dim=-1)
    head = ClassifierHead.from_zeroshot(weights, bundle.model.logit_scale)
    save_classifier(ImageClassifier(bundle.model.visual, head, bundle.preprocess), out, model_name="robustft-tiny",
                    pretrained="none", classnames=load_classnames("imagenet"), templates=["a photo of a {}."],
                    extra={"method": "zeroshot"})


def _results(path: Path, classes_hash: str, **fields: object) -> None:
    row = dict(run=path.stem, method="ft", alpha=None, dataset="id", top1=50.0, top5=90.0, n=10, n_bad=0,
               protocol="all 3 classes", config_hash="abc", git_sha="unknown", seed=0,
               time="2024-01-01T00:00:00+00:00", extra={"classnames_hash": classes_hash})
    row.update(fields)
    if isinstance(row["top1"], float) and row["top1"] > 100:
        path.write_text(json.dumps(row) + "\n")  # ResultRow would refuse it; write the raw line
        return
    append_rows(path, [ResultRow(**row)])  # type: ignore[arg-type]


def _files(sb: Path) -> None:
    (sb / "names.txt").write_text("cat\ndog\nbird\n")
    (sb / "names4.txt").write_text("cat\ndog\nbird\nfish\n")
    (sb / "names_empty.txt").write_text("\n")
    (sb / "names_dup.txt").write_text("cat\ndog\ncat\n")
    (sb / "tpl_nobrace.txt").write_text("a photo of a cat.\n")
    (sb / "tpl_two.txt").write_text("a {} photo of a {}.\n")
    (sb / "weights.bin").write_bytes(b"\x00" * 100)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, sb / "pickled.pt")
    (sb / "bad.yaml").write_text("optim: {lr: [1, 2\n")
    (sb / "list.yaml").write_text("- a\n- b\n")
    (sb / "self.yaml").write_text(f"base: {sb / 'self.yaml'}\n")
    (sb / "unknown_key.yaml").write_text("optim:\n  lrate: 0.1\n")
    (sb / "notrun").mkdir()
    (sb / "notrun" / "notes.txt").write_text("my notes\n")
    (sb / "results_bad.jsonl").write_text('{"run": "x", "method"\n')
    _results(sb / "results_range.jsonl", "aaaaaaaaaaaa", top1=150.0)
    _results(sb / "results_a.jsonl", "aaaaaaaaaaaa")
    _results(sb / "results_b.jsonl", "bbbbbbbbbbbb")


def _damaged_classifiers(sb: Path) -> None:
    tensors, meta = load_tensors(sb / "zs" / "classifier.safetensors")
    trunc = _classifier_copy(sb, "trunc")
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    fake.write_image(sb / "x.png", size=8).replace(_classifier_copy(sb, "foreign"))
    renamed = dict(tensors)
    renamed["head.weights"] = renamed.pop("head.weight")
    save_tensors(_classifier_copy(sb, "renamed"), renamed, meta)
    save_tensors(_classifier_copy(sb, "reshaped"),
                 {**tensors, "head.weight": torch.zeros(5, tensors["head.weight"].shape[1])}, meta)
    (sb / "notclf").mkdir()
    (sb / "notclf" / "classifier.json").write_text('{"hello": 1}')
    shutil.copy(sb / "zs" / "classifier.safetensors", sb / "notclf")
    (sb / "noclf").mkdir()
    shutil.copy(sb / "zs" / "run.json", sb / "noclf" / "run.json")


def _data(sb: Path) -> None:
    fake.make_fake_imagenet(sb / "partial", classes=3, split="train")
    fake.make_fake_imagenet_r(sb / "partial", classes=3)
    fake.make_fake_objectnet(sb / "partial", classes=["banana", "bench"])
    shutil.rmtree(sb / "partial" / "objectnet-1.0" / "mappings")
    fake.make_image_folder(sb / "odd", ["cat", "zebra"], 1)


TRAINED_OVERRIDES = ("--set", "data.limit_train=24", "--set", "data.holdout=8", "--set", "checkpoint.every=0")


def build_sandbox(sb: Path) -> Path:
    """Fill ``sb`` with the files the catalogue's commands refer to (see docs/errors.md)."""
    sb.mkdir(parents=True, exist_ok=True)
    _files(sb)
    _zeroshot(sb, "names.txt", "zs")
    _zeroshot(sb, "names4.txt", "zs4")
    _imagenet_head_run(sb / "inet")
    assert main(["train", "--config", "smoke", "--out", str(sb / "trained"), "--no-eval", "--no-progress",
                 *TRAINED_OVERRIDES]) == 0
    _damaged_classifiers(sb)
    _data(sb)
    return sb


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under ``root`` with its kind, mtime and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        out[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file", stat.st_mtime_ns, digest)
    return out


def run_entry(entry: Entry, sb: Path, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    """Run ``entry``'s command; returns (exit code, stderr with ``sb`` written as ``{sb}``)."""
    try:
        code = main(entry.argv(sb))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err.replace(str(sb), "{sb}")


# ----------------------------------------------------------------------------- tests
ENTRIES = read_entries()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return build_sandbox(tmp_path_factory.mktemp("errors") / "sb")


def test_catalogue_is_large_and_well_formed() -> None:
    ids = [e.id for e in ENTRIES]
    assert len(ENTRIES) >= 30
    assert len(set(ids)) == len(ids), "entry ids must be unique"
    for entry in ENTRIES:
        assert entry.command.startswith("robustft "), entry.id
        assert _ERROR_LINE.match(entry.message), f"{entry.id}: message must be the full 'robustft X: error: ...' line"
        assert entry.message.rstrip(ELLIPSIS).strip(), entry.id


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_bad_input(entry: Entry, sandbox: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(sandbox)
    capsys.readouterr()
    code, err = run_entry(entry, sandbox, capsys)

    assert code == 2, f"{entry.id}: exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"{entry.id}: nothing on stderr"
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    assert errors == [lines[-1]], f"{entry.id}: the error must be one line, the last one:\n{err}"
    assert all(_LOG_LINE.match(line) for line in lines[:-1]), f"{entry.id}: stray output before the error:\n{err}"
    if entry.prefix_only:
        assert lines[-1].startswith(entry.message[: -len(ELLIPSIS)].rstrip()), lines[-1]
    else:
        assert lines[-1] == entry.message
    assert snapshot(sandbox) == before, f"{entry.id}: the command wrote or changed files"


# ----------------------------------------------------------------------------- --update
def _format_row(entry: Entry, message: str) -> str:
    return f"| {entry.id} | `{entry.command}` | `` {message} `` |"


def update_doc(doc: Path = DOC) -> None:
    """Rerun every entry and write its current message into ``doc`` (truncated rows stay truncated)."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        sb = build_sandbox(Path(tmp) / "sb")
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not _ROW.match(line):
                continue
            entry = Entry(*(_unquote(c) for c in _cells(line)))
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code, _ = run_entry(entry, sb)
            last = (err.getvalue().replace(str(sb), "{sb}").strip().splitlines() or [""])[-1]
            if code != 2:
                print(f"{entry.id}: exit code {code} (expected 2); last line: {last}", file=sys.stderr)
            if entry.prefix_only:
                keep = len(entry.message) - len(ELLIPSIS)
                last = last[:keep].rstrip() + " " + ELLIPSIS if len(last) > keep else last
            lines[i] = _format_row(entry, last)
        doc.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_errors_catalogue.py --update")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)
    update_doc()
