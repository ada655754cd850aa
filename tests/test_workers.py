"""The process pool gives the same faces as one process, and keeps going past bad photos."""

from __future__ import annotations

import io
import shutil

from rich.console import Console

from plugin.app import App
from plugin.cli import scan_app
from plugin.setup import initialise

PHOTOS = ["library/events/2024-summit/IMG_2041.jpg", "library/portraits/IMG_3302.jpg",
          "library/friends-and-family/IMG_5103.jpg", "library/misc/IMG_7001.jpg"]


def scan(tmp_path, demo_data, workers, monkeypatch):
    lib = tmp_path / f"w{workers}" / "photos"
    lib.mkdir(parents=True)
    for rel in PHOTOS:
        shutil.copy(demo_data / rel, lib / rel.rsplit("/", 1)[1])
    (lib / "broken.jpg").write_bytes(b"not a photo")
    config = lib.parent / "consentry.toml"
    initialise(config, photos=lib)
    monkeypatch.setenv("CONSENTRY_ENGINE__WORKERS", str(workers))
    with App.open(config) as a:
        assert (a.pipeline.pool is not None) == (workers > 1)
        code = scan_app(a, paths=[], out=Console(file=io.StringIO()))
        faces = {r.asset_id: [f.box for f in a.state.faces("photos", r.asset_id)]
                 for r in a.state.assets()}
        failed = {r.asset_id: r.last_error for r in a.state.assets() if r.last_error}
    return code, faces, failed


def test_pool_finds_the_same_faces_as_one_process(tmp_path, demo_data, monkeypatch):
    # No engine is injected here: App builds its own, and with workers > 1 a pool of processes.
    code1, one, failed1 = scan(tmp_path, demo_data, 1, monkeypatch)
    code2, two, failed2 = scan(tmp_path, demo_data, 2, monkeypatch)
    assert code1 == code2 == 1  # the broken photo
    assert failed1.keys() == failed2.keys()
    assert one == two and sum(len(v) for v in two.values()) >= 10
    assert set(failed2) == {"broken.jpg"} and "not a recognised image" in failed2["broken.jpg"]


def test_errors_survive_a_trip_through_a_process_boundary():
    import pickle

    from plugin.errors import ConfigError, ImageError, UnavailableError

    for err in (ImageError("a.jpg", "truncated"), UnavailableError("nc", "HTTP 503"),
                ConfigError("bad", file="c.toml", key="x")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_a_slow_photo_does_not_hold_back_the_ones_behind_it(tmp_path, demo_data, monkeypatch):
    # The 24-face collage takes seconds of one worker; the portraits listed after it are
    # finished by the other worker and completed (written, recorded) before it.
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(demo_data / "library/events/2024-summit/IMG_2049.jpg", lib / "a-crowd.jpg")
    portraits = sorted((demo_data / "library/portraits").glob("IMG_33*.jpg"))[:6]
    for i, p in enumerate(portraits):
        shutil.copy(p, lib / f"b{i}-{p.name}")
    config = tmp_path / "consentry.toml"
    initialise(config, photos=lib)
    monkeypatch.setenv("CONSENTRY_ENGINE__WORKERS", "2")
    order: list[str] = []
    with App.open(config) as a:
        results = a.pipeline.scan("photos", on_result=lambda r: order.append(r.ref.id))
        crowd = len(a.state.faces("photos", "a-crowd.jpg"))
    assert {r.outcome.value for r in results} == {"processed"} and len(order) == 7
    assert order[0] != "a-crowd.jpg" and order.index("a-crowd.jpg") >= 3
    assert crowd == 24
