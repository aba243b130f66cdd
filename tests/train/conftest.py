"""Fixtures of the trainer tests: the tiny data set and config of tiny.py, and
:func:`built_once` for the runs several tests compare against."""

import fcntl
import functools
import importlib.util
import json
import os
import shutil

import pytest


def _load_tiny():
    spec = importlib.util.spec_from_file_location(
        "diffjax_tests_tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_once(tmp_path_factory, name: str, build):
    """``build(directory)`` once per test session, for all pytest-xdist workers: the first
    worker to ask runs it while it holds a lock, the others wait for it; every caller gets
    (the directory, build's JSON-serialisable result). A module fixture alone would be built
    by each worker that runs one of its tests (a 2-process training run twice, on the same
    2 cores). A build that raised is started afresh by the next caller."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' own base directories lie side by side in it
    directory, record = base / name, base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not record.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a failed build's remains
            directory.mkdir()
            record.write_text(json.dumps(build(str(directory))))
        return str(directory), json.loads(record.read_text())


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """:func:`_built_once` of this session: ``built_once(name, build)``."""
    return functools.partial(_built_once, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny():
    return _load_tiny()


@pytest.fixture(scope="session")
def tiny_data(tiny, built_once):
    return built_once("tiny_data", tiny.write_dataset)[0]
