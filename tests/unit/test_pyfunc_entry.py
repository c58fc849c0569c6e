"""``unshadow_running_flava``: the logged model's partial ``flava`` copy leaves ``sys.path`` without disturbing a
thread that is walking ``sys.path`` at that moment (the Prefect route trains two stages in threads of one process,
and one thread's model logging ran this while the other looked up an installed package's version)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flava.tracking import pyfunc_entry


def _model_code_dir(root, name):
    """A logged model's layout as MLflow writes it: ``<model>/MLmodel`` and ``<model>/code/flava/__init__.py``."""
    model = root / name
    (model / "code" / "flava").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "code" / "flava" / "__init__.py").write_text("")
    return str(model / "code")


@pytest.fixture
def restore_sys_path():
    saved = sys.path
    yield
    sys.path = saved


def test_a_foreign_copy_is_dropped_and_a_walk_in_progress_sees_every_entry(tmp_path, restore_sys_path):
    foreign = _model_code_dir(tmp_path, "model")
    sys.path = [foreign, *sys.path]
    walking = sys.path  # what a concurrent importlib.metadata lookup iterates
    walk = iter(walking)
    assert next(walk) == foreign  # the other thread is past the copy, about to read the entries after it
    expected_rest = walking[1:]

    assert pyfunc_entry.unshadow_running_flava() == [foreign]

    assert foreign not in sys.path
    assert list(walk) == expected_rest  # an in-place removal shifted the list under the walk: it skipped one


def test_the_running_flava_and_ordinary_entries_stay(tmp_path, restore_sys_path):
    import flava

    plain = tmp_path / "code"  # named "code" but no MLmodel beside it: not a model's code directory
    (plain / "flava").mkdir(parents=True)
    (plain / "flava" / "__init__.py").write_text("")
    running_parent = str(Path(flava.__file__).resolve().parent.parent)
    sys.path = [str(plain), running_parent, *sys.path]
    before = list(sys.path)

    assert pyfunc_entry.unshadow_running_flava() == []
    assert sys.path == before
