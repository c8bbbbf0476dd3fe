"""Where a server's torch work runs (model_core.serving.threads): one model thread, file work on one core."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from model_core.serving.threads import model_thread_ident, one_core, run_on_model_thread


def test_model_work_runs_on_one_thread_whichever_thread_asks():
    with ThreadPoolExecutor(4) as requests:
        idents = set(requests.map(lambda _: run_on_model_thread(threading.get_ident), range(16)))
    assert idents == {model_thread_ident()} and model_thread_ident() != threading.get_ident()
    # model work that calls model work runs inline (no deadlock on the one thread)
    assert run_on_model_thread(lambda: run_on_model_thread(threading.get_ident)) == model_thread_ident()


def test_the_model_threads_exception_is_raised_in_the_caller():
    def fail():
        raise ValueError("label not in the support set")

    with pytest.raises(ValueError, match="label not in the support set"):
        run_on_model_thread(fail)
    assert run_on_model_thread(lambda: 2 + 2) == 4  # and the thread still serves


def test_torch_keeps_its_threads_on_the_model_thread_and_one_core_limits_only_the_block():
    cores = torch.get_num_threads()
    inside = {}

    def file_work():
        with one_core():
            inside["file"] = torch.get_num_threads()
            torch.rand(1_000_000).exp().sum()  # runs, on this thread alone
        inside["after"] = torch.get_num_threads()

    worker = threading.Thread(target=file_work)
    worker.start()
    worker.join()
    assert inside == {"file": 1, "after": cores}
    assert run_on_model_thread(torch.get_num_threads) == cores


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_starts_its_own_model_thread():
    run_on_model_thread(lambda: None)  # the parent's thread exists
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker thread did not come along
        try:
            ok = run_on_model_thread(threading.get_ident) == model_thread_ident() != threading.get_ident()
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)


def test_a_process_ends_without_waiting_for_the_model_work_under_way():
    """Ctrl-C on a command, or a server told to stop, ends the process now, not after the volume under way."""
    import subprocess
    import sys

    code = (
        "import threading, time\n"
        "from model_core.serving.threads import run_on_model_thread\n"
        "threading.Thread(target=run_on_model_thread, args=(time.sleep, 600), daemon=True).start()\n"
        "time.sleep(0.5)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
