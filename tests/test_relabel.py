"""Re-labelling writes on several exiftool processes at once (issue #4, re-labelling speed)."""

from __future__ import annotations

import shutil
import threading

from plugin.xmp import XmpWriter


def test_writer_processes_outlive_the_threads_that_used_them(tmp_path, demo_data):
    # pyexiftool asks Linux to kill exiftool when the thread that started it ends; the writer
    # starts its processes on its own long-lived thread, so short-lived worker threads (one
    # re-labelling run) leave them running for the next call.
    photos = sorted((demo_data / "library" / "portraits").glob("*.jpg"))[:6]
    for p in photos:
        shutil.copy(p, tmp_path / p.name)
    files = sorted(tmp_path.glob("*.jpg"))
    with XmpWriter(processes=2) as writer:
        barrier = threading.Barrier(2)

        def read(part):
            barrier.wait()  # both threads at once: both processes get started
            for f in part:
                writer.read(f)

        threads = [threading.Thread(target=read, args=(files[i::2],)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started = [et for et in writer._all if et._process is not None]
        assert started and all(et.running for et in started)
        assert writer.read(files[0]).regions == ()
