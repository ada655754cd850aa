"""Thumbnails and face crops, rendered in memory from the connector's preview.

Nothing is stored: the JPEG is built in a buffer and returned; a copy the connector had to
download into its work folder (remote platforms) is deleted right after. A crop is a face, that
is biometric data on screen, so responses are `no-store` like every console page.
"""

from __future__ import annotations

import io
import logging
from contextlib import suppress
from pathlib import Path

from PIL import Image

from plugin.app import App
from plugin.errors import ConsentryError
from plugin.imaging import decode
from plugin.models import FaceBox

log = logging.getLogger(__name__)

THUMB_SIDE = 320
CROP_SIDE = 200
_MARGIN = 0.3  # context around a face box, as a fraction of its size


class MediaError(ConsentryError):
    """The picture cannot be shown (asset gone, platform down); the page shows a placeholder."""


def thumbnail(app: App, connector: str, asset_id: str, *, box: FaceBox | None = None) -> bytes:
    """A JPEG of the asset (or of one face, `box` in displayed pixels of the original)."""
    row = app.state.asset(connector, asset_id)
    plugin = app.connectors.get(connector)
    if row is None or plugin is None:
        raise MediaError(f"{connector}:{asset_id}: unknown asset")
    try:
        fetched = plugin.fetch(row.ref, "analysis")
    except ConsentryError as err:
        raise MediaError(f"{connector}:{asset_id}: {err}") from err
    try:
        image = decode(fetched.path, asset=row.name, max_side=1600)
        pixels = Image.fromarray(image.pixels)
        if box is not None:
            width, height = (fetched.original or image.geometry).displayed_size
            pixels = pixels.crop(_scaled(box, pixels.width / width, pixels.height / height,
                                         pixels.width, pixels.height))
            side = CROP_SIDE
        else:
            side = THUMB_SIDE
        pixels.thumbnail((side, side))
        out = io.BytesIO()
        pixels.save(out, format="JPEG", quality=80)
        return out.getvalue()
    except ConsentryError as err:
        raise MediaError(f"{connector}:{asset_id}: {err}") from err
    finally:
        _drop_download(app, fetched.path)


def _scaled(box: FaceBox, sx: float, sy: float, width: int, height: int
            ) -> tuple[int, int, int, int]:
    mx, my = box.width * _MARGIN, box.height * _MARGIN
    left = max(0, int((box.left - mx) * sx))
    top = max(0, int((box.top - my) * sy))
    right = min(width, int((box.right + mx) * sx) + 1)
    bottom = min(height, int((box.bottom + my) * sy) + 1)
    return left, top, max(right, left + 1), max(bottom, top + 1)


def _drop_download(app: App, path: Path) -> None:
    # Only copies inside Consentry's work folder: a folder connector hands us the original.
    work = app.settings.resolve(Path(".consentry/work")).resolve()
    with suppress(OSError, ValueError):
        if path.resolve().is_relative_to(work):
            path.unlink(missing_ok=True)
            if path.parent.resolve() != work:
                path.parent.rmdir()  # a per-asset folder (Nextcloud); kept if not empty
