"""diffjax.main starts over with glibc's huge-page tunable where it changes something."""

import os
import subprocess
import sys

import pytest

from diffjax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the subprocesses run first: this machine's glibc and THP mode made the ones where the
# tunable applies, so the re-execution is tested wherever the tests run
PRETEND = ("from diffjax import hugepages; hugepages.glibc_version = lambda: (2, 36); "
           "hugepages.thp_mode = lambda: 'madvise'; ")
SHOW = ("from diffjax import hugepages, main; import os; "
        "print(os.environ.get('GLIBC_TUNABLES', '(unset)'), main._STARTED)")


def test_the_tunable_is_added_once_and_a_users_setting_kept():
    assert hugepages.with_tunable("") == "glibc.malloc.hugetlb=1"
    assert hugepages.with_tunable("glibc.malloc.arena_max=2") == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.with_tunable("glibc.malloc.hugetlb=0") is None
    assert hugepages.with_tunable("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2") is None


def test_thp_mode_reads_the_selected_one(tmp_path):
    path = tmp_path / "enabled"
    for text, mode in [("always [madvise] never\n", "madvise"),
                       ("[always] madvise never\n", "always"), ("always madvise [never]", "never")]:
        path.write_text(text)
        assert hugepages.thp_mode(str(path)) == mode
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_wanted_only_where_it_changes_something(monkeypatch):
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    assert hugepages.wanted({}) == "glibc.malloc.hugetlb=1"
    assert hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    for mode in ("always", "never", None):
        monkeypatch.setattr(hugepages, "thp_mode", lambda mode=mode: mode)
        assert hugepages.wanted({}) is None
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 34))  # no such tunable
    assert hugepages.wanted({}) is None
    monkeypatch.setattr(hugepages, "glibc_version", lambda: None)  # musl, macOS
    assert hugepages.wanted({}) is None


def _run(code_or_module, env_extra, module=False):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                           hugepages.STARTED_ENV)}
    env.update(env_extra)
    args = ["-m", code_or_module] if module else ["-c", code_or_module]
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's tunable: Linux")
def test_main_reexecutes_itself_with_the_tunable_and_keeps_its_start_time(tmp_path):
    # what `python -m diffjax.main` does before importing JAX, in a process of its own
    script = tmp_path / "entry.py"
    script.write_text("import time\nstarted = time.time()\n" + PRETEND.replace("; ", "\n") +
                      "hugepages.maybe_reexec(started)\n"
                      "import os\nprint(os.environ.get('GLIBC_TUNABLES'), started,"
                      " os.environ.get('DIFFJAX_STARTED'))\n")
    out = _run(f"import runpy, sys; sys.argv = [{str(script)!r}]; "
               f"runpy.run_path({str(script)!r}, run_name='__main__')", {})
    assert out.returncode == 0, out.stderr[-2000:]
    tunables, _, handed_on = out.stdout.split()
    assert tunables == "glibc.malloc.hugetlb=1"
    float(handed_on)  # the first exec's start time reached the second
    # diffjax.main reads it back (and removes it from its environment)
    shown = _run(SHOW, {hugepages.STARTED_ENV: "123.5"})
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.split()[1] == "123.5"
    # a user's choice is kept, and nothing starts over
    kept = _run(f"import runpy, sys; sys.argv = [{str(script)!r}]; "
                f"runpy.run_path({str(script)!r}, run_name='__main__')",
                {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert kept.stdout.split()[0] == "glibc.malloc.hugetlb=0"
    assert kept.stdout.split()[2] == "None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc: Linux")
def test_the_cli_runs_with_the_tunable(tmp_path):
    """diffjax.main run as ``__main__`` (``--mode summary``): its process (after the exec) has
    the tunable, read from /proc since the summary does not print it."""
    cli = PRETEND + ("import runpy, sys; sys.argv = ['diffjax.main'] + sys.argv[1:]; "
                     "runpy.run_module('diffjax.main', run_name='__main__', alter_sys=True)")
    out = _run(cli, {})  # no --config: one error line, after the exec
    assert out.returncode != 0 and "--config is required" in out.stderr
    code = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', {cli!r}, '--config', "
            "'experiments/fashion_mnist.py', '--mode', 'summary'], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL)\n"
            "env = b''\n"
            "for _ in range(600):\n"
            "    time.sleep(0.05)\n"
            "    try:\n"
            "        env = open(f'/proc/{p.pid}/environ', 'rb').read()\n"
            "    except OSError:\n"
            "        break\n"
            "    if b'GLIBC_TUNABLES' in env:\n"
            "        break\n"
            "p.wait()\n"
            "print(b'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in env.split(b'\\0'), p.returncode)\n")
    shown = _run(code, {})
    assert shown.stdout.split() == ["True", "0"], shown.stdout + shown.stderr[-2000:]


@pytest.mark.skipif(hugepages.glibc_version() is None, reason="malloc_trim is glibc's")
def test_release_freed_memory_hands_back_what_malloc_kept():
    """300 MB malloc'ed in 100 kB blocks (under the mmap threshold: from the heap) and freed
    but for the last, which keeps the heap from shrinking: the freed memory stays resident
    until release_freed_memory, which hands nearly all of it back."""
    code = (
        "import ctypes\n"
        "from diffjax import hugepages\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss_mb():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024\n"
        "blocks = [libc.malloc(100_000) for _ in range(3000)]\n"
        "for b in blocks:\n"
        "    ctypes.memset(b, 1, 100_000)\n"
        "for b in blocks[:-1]:\n"
        "    libc.free(b)\n"
        "before = rss_mb()\n"
        "ran = hugepages.release_freed_memory()\n"
        "print(ran, before, rss_mb())\n")
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ran, before, after = out.stdout.split()
    assert ran == "True"
    assert float(before) - float(after) > 250, out.stdout  # of the 286 MB freed
