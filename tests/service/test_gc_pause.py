"""service.services.gc_pause: the collector is paused while any batch is inside, and only then."""

from __future__ import annotations

import gc
import threading

from service.services import gc_pause


def test_pause_nests_across_threads_and_resumes_after_the_last() -> None:
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_pause.paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_pause.paused():
        assert not gc.isenabled()
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other batch is still inside
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_an_error_inside_still_resumes_and_a_disabled_collector_is_left_alone() -> None:
    try:
        with gc_pause.paused():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_pause.paused():
            pass
        assert not gc.isenabled()  # not ours to turn back on
    finally:
        gc.enable()
