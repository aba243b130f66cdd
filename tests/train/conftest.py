"""Fixtures of the trainer tests: the tiny data set and config of tiny.py."""

import importlib.util
import os

import pytest


def _load_tiny():
    spec = importlib.util.spec_from_file_location(
        "diffjax_tests_tiny", os.path.join(os.path.dirname(__file__), "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    return _load_tiny()


@pytest.fixture(scope="session")
def tiny_data(tiny, tmp_path_factory):
    return tiny.write_dataset(str(tmp_path_factory.mktemp("tiny_data")))
