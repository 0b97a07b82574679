"""Crash recovery of writers: a killed export, quantisation or training save leaves temporaries that the next run
of the same output removes (only when their writer is dead), a kill between ``BundleWriter.commit``'s two renames
never loses the previous bundle, and the messages a user sees after such crashes say what happened.

Bundles here are tiny: a one-node ONNX graph with a valid ``usfm.json`` (no torch needed for the writer tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from usfm_edge.core.bundle_schema import BundleMeta, InputContract, TensorSpec, default_thresholds
from usfm_edge.core.io import atomic_write_text, clean_before_write, owner_tag, remove_stale_temps
from usfm_edge.export.bundle import BundleWriter, write_bundle
from usfm_edge.runtime.bundle_io import read_meta, verify_bundle

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _dead_tag() -> str:
    """An ``owner_tag`` of a process of this machine that has exited."""
    return f"{_dead_pid()}-{owner_tag().split('-', 1)[1]}"


def _meta(notes: list[str] | None = None) -> BundleMeta:
    return BundleMeta(task="seg", labels=["background", "lesion"],
                      input=InputContract(TensorSpec("frame", "uint8", ["batch", "height", "width"]),
                                          dynamic_axes=["batch", "height", "width"]),
                      outputs=[TensorSpec("probs", "float32", ["batch", 2, "height", "width"]),
                               TensorSpec("mask", "uint8", ["batch", "height", "width"])],
                      preprocessing={"img_size": 64}, precision="fp32", backend="onnxruntime", target="onnx",
                      files={"onnx": "model.onnx"}, thresholds=default_thresholds("fp32"), notes=notes or [])


@pytest.fixture(scope="module")
def model_onnx(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["frame"], ["probs"])], "g",
                              [helper.make_tensor_value_info("frame", TensorProto.UINT8, ["b", "h", "w"])],
                              [helper.make_tensor_value_info("probs", TensorProto.UINT8, ["b", "h", "w"])])
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def _bundle(out: Path, model: Path, note: str) -> Path:
    return write_bundle(out, _meta([note]), {"model.onnx": model})


def _stale_temp(parent: Path, name: str, tag: str, suffix: str = "") -> Path:
    p = parent / f".{name}.tmp-{tag}{suffix}"
    p.mkdir()
    (p / "model.onnx").write_bytes(b"x" * 100)
    return p


# -- 1. the next writer cleans dead writers' temporaries and restores an interrupted replace -------------------------
def test_next_writer_removes_dead_writers_temporaries(model_onnx, tmp_path):
    dead = _dead_tag()
    stale = [_stale_temp(tmp_path, "seg.usfm", dead), _stale_temp(tmp_path, "seg.usfm", dead, "-scratch"),
             _stale_temp(tmp_path, "seg.usfm", dead, "-work")]
    legacy = _stale_temp(tmp_path, "seg.usfm", "0123abcd")  # an older version's name: no PID, judged by age
    old = time.time() - 7 * 3600
    os.utime(legacy, (old, old))
    young_legacy = _stale_temp(tmp_path, "seg.usfm", "89abcdef")
    live = _stale_temp(tmp_path, "seg.usfm", owner_tag())  # this process: a concurrent writer, never touched
    other = _stale_temp(tmp_path, "other.usfm", dead)  # another bundle's temporary: not ours to remove
    out = _bundle(tmp_path / "seg", model_onnx, "first")
    assert not any(p.exists() for p in [*stale, legacy])
    assert live.exists() and young_legacy.exists() and other.exists()
    assert read_meta(out).notes == ["first"]


def test_next_writer_restores_a_bundle_lost_between_the_renames(model_onnx, tmp_path):
    out = _bundle(tmp_path / "seg", model_onnx, "previous")
    moved = tmp_path / f".seg.usfm.old-{_dead_tag()}"
    os.replace(out, moved)  # what a kill between commit's two renames leaves: no bundle, the old one aside
    new_tmp = _stale_temp(tmp_path, "seg.usfm", _dead_tag())
    assert clean_before_write(out)  # what BundleWriter runs first
    assert verify_bundle(out).notes == ["previous"] and not moved.exists() and not new_tmp.exists()
    # and through a writer that refuses to overwrite: the restored bundle counts as existing
    os.replace(out, moved)
    with pytest.raises(Exception, match="already exists"):
        BundleWriter(out, overwrite=False)
    assert verify_bundle(out).notes == ["previous"]


def test_an_old_copy_left_after_a_complete_commit_is_removed(model_onnx, tmp_path):
    out = _bundle(tmp_path / "seg", model_onnx, "new")
    leftover = tmp_path / f".seg.usfm.old-{_dead_tag()}"
    leftover.mkdir()
    _bundle(tmp_path / "seg", model_onnx, "newer")
    assert not leftover.exists() and read_meta(out).notes == ["newer"]


# -- 2. commit never loses the previous bundle ----------------------------------------------------------------------
def test_commit_puts_the_previous_bundle_back_when_the_second_rename_fails(model_onnx, tmp_path, monkeypatch):
    out = _bundle(tmp_path / "seg", model_onnx, "previous")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is told to stop between the renames
        return real(src, dst)

    w = BundleWriter(out)
    w.add(model_onnx, "model.onnx")
    w.write_meta(_meta(["next"]))
    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.setattr(os, "replace", real)
    w.abort()
    assert verify_bundle(out).notes == ["previous"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.usfm"]


_KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from usfm_edge.export.bundle import BundleWriter
from tests.test_crash_recovery import _meta
real = os.replace
def replace(src, dst):
    real(src, dst)
    if ".old-" in str(dst):
        os._exit(9)  # killed right after the old bundle moved aside
os.replace = replace
w = BundleWriter({out!r})
w.add({model!r}, "model.onnx")
w.write_meta(_meta(["next"]))
w.commit()
"""


def test_a_process_killed_between_the_renames_loses_nothing(model_onnx, tmp_path):
    out = _bundle(tmp_path / "seg", model_onnx, "previous")
    code = _KILL_BETWEEN_RENAMES.format(root=str(ROOT), out=str(out), model=str(model_onnx))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 9, r.stderr[-2000:]
    assert not out.exists() and len(list(tmp_path.glob(".seg.usfm.old-*"))) == 1  # the crash happened
    assert len(list(tmp_path.glob(".seg.usfm.tmp-*"))) == 1
    _bundle(tmp_path / "seg", model_onnx, "after")  # the next export recovers, then replaces it
    assert read_meta(out).notes == ["after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.usfm"]


# -- atomic files: a killed writer's temporary carries its PID ------------------------------------------------------
def test_atomic_write_temporaries_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_write_text(target, "complete")
    dead = tmp_path / f"checkpoint.pt.{_dead_tag()}.tmp"
    dead.write_bytes(b"half")
    live = tmp_path / f"checkpoint.pt.{owner_tag()}.tmp"
    live.write_bytes(b"writing")
    assert remove_stale_temps(target) == [dead]
    assert live.exists() and target.read_text() == "complete"


# -- 3. training checkpoints: the complete one is kept, a killed save is cleaned up and explained ------------------
def _save(path: Path, step: int) -> None:
    torch = pytest.importorskip("torch")
    from usfm_edge.train.engine import TrainState, save_training_state

    model = torch.nn.Linear(2, 2)
    save_training_state(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        state=TrainState(step=step), config={"task": "seg"})


def test_a_killed_save_keeps_the_complete_checkpoint_and_its_temp_is_removed(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from usfm_edge.train.engine import remove_stale_checkpoint_temps, resume_payload

    run = tmp_path / "run"
    _save(run / "checkpoint.pt", step=3)

    def killed(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(run / "checkpoint.pt", step=4)
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # the exception path removes its temp
    dead = run / f"checkpoint.pt.{_dead_tag()}.tmp"  # what a SIGKILL leaves instead
    dead.write_bytes(b"half a checkpoint")
    legacy = run / "checkpoint.pt.k3j_x9ab.tmp"  # an older version's name, 20 minutes old
    legacy.write_bytes(b"half")
    os.utime(legacy, (time.time() - 1200, time.time() - 1200))
    live = run / f"checkpoint.pt.{owner_tag()}.tmp"  # a save in progress
    live.write_bytes(b"writing")
    payload, path = resume_payload(run, "checkpoint.pt")
    assert payload["step"] == 3 and path == run / "checkpoint.pt"
    assert not dead.exists() and not legacy.exists() and live.exists()
    live.unlink()
    dead.write_bytes(b"x")
    assert remove_stale_checkpoint_temps(run / "checkpoint.pt") == [dead]  # what a fresh run does first


def test_resume_after_a_kill_during_the_first_save_says_so(tmp_path):
    pytest.importorskip("torch")
    from usfm_edge.core.errors import CheckpointError
    from usfm_edge.train.engine import resume_payload

    run = tmp_path / "run"
    run.mkdir()
    (run / f"checkpoint.pt.{_dead_tag()}.tmp").write_bytes(b"half a checkpoint")
    with pytest.raises(CheckpointError, match="no complete checkpoint.pt yet; the run died during its first save") as e:
        resume_payload(run, "checkpoint.pt")
    assert "start it again without --resume" in str(e.value) and "not found" not in str(e.value)
    assert list(run.iterdir()) == []  # and its temporary is gone
    with pytest.raises(CheckpointError, match="not found"):  # no save ever started: not found, as before
        resume_payload(run, "checkpoint.pt")


class _Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/usfm_edge_pwned_resume', 'w').write('x')",))


def test_resume_from_a_code_running_pickle_says_it_was_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from usfm_edge.core.errors import CheckpointError
    from usfm_edge.train.engine import resume_payload

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "usfm_edge.train_state/1", "x": _Evil()}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError) as e:
        resume_payload(run, "checkpoint.pt")
    text = str(e.value)
    assert "refused: the pickle references builtins.exec" in text and "contains code and was refused" in text, text
    assert "truncated" not in text and "\x1b" not in text, text
    assert not os.path.exists("/tmp/usfm_edge_pwned_resume")
