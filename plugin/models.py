"""Domain model (DESIGN §4): subjects, consents with their grants, faces, verdicts.

Coordinates: a `FaceBox` is in face_recognition's css order (top, right, bottom, left), integer
pixels of the image **as displayed** (EXIF orientation applied), right/bottom exclusive. The XMP
writer converts to the stored grid through `Geometry`.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

DEFAULT_CHANNELS: tuple[str, ...] = (
    "internal",
    "intranet",
    "website",
    "social",
    "print",
    "advertising",
)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetime must carry a timezone")
    return value


AwareDatetime = Annotated[datetime, AfterValidator(_aware)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GrantKind(StrEnum):
    BIOMETRIC = "biometric"
    PUBLICATION = "publication"


class Grant(_Frozen):
    """One permission inside a signed quitclaim, with its own validity."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    kind: GrantKind
    channels: tuple[str, ...] = ()
    valid_from: AwareDatetime
    valid_until: AwareDatetime | None = None
    withdrawn_at: AwareDatetime | None = None

    def active_at(self, t: datetime) -> bool:
        """valid_from <= t < valid_until (or open) and t < withdrawn_at (or never)."""
        if t < self.valid_from:
            return False
        if self.valid_until is not None and t >= self.valid_until:
            return False
        return self.withdrawn_at is None or t < self.withdrawn_at

    def ended_by_withdrawal(self) -> bool:
        """True when withdrawal, not expiry, ended (or will end) this grant first."""
        if self.withdrawn_at is None:
            return False
        return self.valid_until is None or self.withdrawn_at <= self.valid_until

    def end(self) -> datetime | None:
        ends = [e for e in (self.valid_until, self.withdrawn_at) if e is not None]
        return min(ends) if ends else None


class Subject(_Frozen):
    """A person the admin knows of. Registering gives no right to process (DESIGN §4)."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    display_name: str = Field(min_length=1)
    birth_date: date | None = None
    minor: bool = False
    external_ids: dict[str, str] = Field(default_factory=dict)


class Consent(_Frozen):
    """One signed quitclaim: who signed, which document, and its grants."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    subject_id: uuid.UUID
    document_ref: str
    document_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    signed_at: AwareDatetime
    signed_by: str | None = None
    guardian: bool = False
    grants: tuple[Grant, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _guardian_named(self) -> Consent:
        if self.guardian and not self.signed_by:
            raise ValueError("a guardian's signature must name the guardian (signed_by)")
        return self


class Geometry(_Frozen):
    """Pixel grid of an image as stored, and the EXIF orientation (1-8) readers apply."""

    stored_width: int = Field(gt=0)
    stored_height: int = Field(gt=0)
    orientation: int = Field(default=1, ge=1, le=8)

    @property
    def swaps_axes(self) -> bool:
        return self.orientation >= 5

    @property
    def displayed_size(self) -> tuple[int, int]:
        if self.swaps_axes:
            return self.stored_height, self.stored_width
        return self.stored_width, self.stored_height


class FaceBox(_Frozen):
    """css order, displayed pixels, right/bottom exclusive."""

    top: int
    right: int
    bottom: int
    left: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def iou(self, other: FaceBox) -> float:
        ih = max(0, min(self.bottom, other.bottom) - max(self.top, other.top))
        iw = max(0, min(self.right, other.right) - max(self.left, other.left))
        inter = ih * iw
        union = self.width * self.height + other.width * other.height - inter
        return inter / union if union > 0 else 0.0

    def as_css(self) -> tuple[int, int, int, int]:
        return (self.top, self.right, self.bottom, self.left)


class FaceState(StrEnum):
    AUTO = "auto"
    CONFIRMED = "confirmed"
    REJECTED = "rejected"
    UNKNOWN = "unknown"
    UNCERTAIN = "uncertain"


class FaceRecord(_Frozen):
    """What is remembered of one detected face: never its vector (DESIGN §6)."""

    box: FaceBox
    state: FaceState
    subject_id: uuid.UUID | None = None
    distance: float | None = None
    candidates: tuple[uuid.UUID, ...] = ()
    # Named by same-run corroboration (plugin/corroboration.py): the anchor face's reference,
    # `<connector>:<asset id>#<index>`; a reviewer rejecting that face takes this name back.
    vouched_by: str | None = None


class Status(StrEnum):
    """Per-asset consent status, DESIGN §5."""

    NO_FACES = "no_faces"
    CLEARED = "cleared"
    LIMITED = "limited"
    REVIEW = "review"
    MISSING = "missing"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


# Worst first: the asset takes the most severe status of its faces.
SEVERITY: tuple[Status, ...] = (
    Status.WITHDRAWN,
    Status.EXPIRED,
    Status.MISSING,
    Status.REVIEW,
    Status.LIMITED,
    Status.CLEARED,
)


class ModelRelease(StrEnum):
    """PLUS ModelReleaseStatus codes."""

    NONE = "MR-NON"
    NOT_APPLICABLE = "MR-NAP"
    UNLIMITED = "MR-UMR"
    LIMITED = "MR-LMR"


class FaceVerdict(_Frozen):
    """A face as the policy sees it now. `name`/`subject_id` are set only when §5 allows."""

    box: FaceBox
    status: Status
    subject_id: uuid.UUID | None = None
    name: str | None = None
    channels: tuple[str, ...] = ()
    consent_ids: tuple[uuid.UUID, ...] = ()
    valid_until: datetime | None = None
    minor: bool = False


class AssetVerdict(_Frozen):
    status: Status
    model_release: ModelRelease
    channels: tuple[str, ...] = ()
    valid_until: datetime | None = None
    consent_ids: tuple[uuid.UUID, ...] = ()
    faces: tuple[FaceVerdict, ...] = ()
    unidentified: int = 0
    minor: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for face in self.faces:
            if face.name:
                seen.setdefault(face.name, None)
        return tuple(seen)


class AssetRef(_Frozen):
    """An asset as a connector announces it; `version` changes whenever its content does."""

    connector: str
    id: str
    version: str
    name: str
    mime: str | None = None
    fingerprint: str | None = None
