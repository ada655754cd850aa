"""Consent invitations (issue #9): a signed, expiring, single-use link for one data subject.

The admin creates an invitation for a registered person: which publication channels are asked,
whether biometric consent (recognition) is asked too, for how long, and whether a guardian
signs (always for a minor, DESIGN §4). The link carries only the invitation id, signed with a
key derived from the key-encryption key (itsdangerous); it expires after `portal.invitation_days`
and is claimed once, in the same database row that records the consent it produced.

Accepting goes through the same paths as the CLI: `people.add_consent`, `people.enroll` (only
when biometric consent was given; the selfie lives in a private temporary file during the check
and is deleted afterwards, whatever happens) and, for the permanent withdrawal link on the
receipt, `people.withdraw_consent`. The consent's document is the request itself: a canonical
JSON of what was asked and answered, its sha256 stored with the consent and the invitation, and
the JSON kept encrypted in the vault under the person's own key when the vault can hold
documents, so an erasure destroys it.

Pages and e-mails live elsewhere (plugin/web/portal.py, plugin/mailer.py); this module is the
decision logic and is tested without HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from plugin import keys, people
from plugin.consent import is_minor, standing
from plugin.errors import ConsentError, ConsentryError, EnrollmentError, ImageError
from plugin.imaging import decode
from plugin.models import Consent, Grant, GrantKind, Subject

if TYPE_CHECKING:
    from plugin.app import App
    from plugin.mailer import Mailer

log = logging.getLogger(__name__)

# Mirror of the tables migration 0005 creates (plugin/schema.py holds the core ones).
_metadata = sa.MetaData()
invitations = sa.Table(
    "invitations",
    _metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("subject_id", sa.String(36), nullable=False),
    sa.Column("channels", sa.JSON, nullable=False),
    sa.Column("valid_days", sa.Integer),
    sa.Column("guardian", sa.Boolean, nullable=False),
    sa.Column("biometric", sa.Boolean, nullable=False),
    sa.Column("created_by", sa.String(64)),
    sa.Column("lang", sa.String(8), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False),
    sa.Column("used_at", sa.String(32)),
    sa.Column("consent_id", sa.String(36)),
    sa.Column("request_sha256", sa.String(64)),
)

PORTAL_PREFIX = "/p"
DOCUMENT_KIND = "consentry.portal.consent/1"
LANGS = ("en", "nl")
_INVITE_SALT = "consentry.portal.invitation"
_WITHDRAW_SALT = "consentry.portal.withdrawal"
# Audit actor of what the data subject does through the portal (consent, enrollment, withdrawal).
PORTAL_ACTOR = "subject"

Refusal = Literal["invalid", "expired", "used", "unknown"]


class InvitationError(ConsentryError):
    """A link that cannot be used; `reason` picks the page the person sees."""

    def __init__(self, reason: Refusal, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class AnswerError(ConsentryError):
    """The form is incomplete or the selfie is not usable; `key` is the message to show."""

    def __init__(self, key: str, message: str, **values: object) -> None:
        self.key, self.values = key, values
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Invitation:
    id: uuid.UUID
    subject_id: uuid.UUID
    channels: tuple[str, ...]
    valid_days: int
    guardian: bool
    biometric: bool
    lang: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None = None
    consent_id: uuid.UUID | None = None
    request_sha256: str | None = None
    created_by: str | None = None

    def state(self, now: datetime) -> Literal["open", "used", "expired"]:
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires_at else "open"


class Links:
    """Signs and opens the two kinds of portal link. Tokens hold ids only, never a name."""

    def __init__(self, kek: bytes) -> None:
        secret = keys.derive_key(kek, "portal-links")
        self._invite = URLSafeTimedSerializer(secret, salt=_INVITE_SALT)
        self._withdraw = URLSafeTimedSerializer(secret, salt=_WITHDRAW_SALT)

    def invitation_token(self, invitation_id: uuid.UUID) -> str:
        return self._invite.dumps({"i": str(invitation_id)})

    def withdrawal_token(self, consent_id: uuid.UUID) -> str:
        return self._withdraw.dumps({"c": str(consent_id)})

    def open_invitation(self, token: str, *, max_age: timedelta) -> uuid.UUID:
        try:
            data = self._invite.loads(token, max_age=int(max_age.total_seconds()))
            return uuid.UUID(data["i"])
        except SignatureExpired as err:
            raise InvitationError("expired", "the invitation link has expired") from err
        except (BadSignature, KeyError, TypeError, ValueError) as err:
            raise InvitationError("invalid", "the invitation link is not valid") from err

    def open_withdrawal(self, token: str) -> uuid.UUID:
        # Permanent on purpose: withdrawing must stay as easy as giving (GDPR Art. 7(3)).
        try:
            return uuid.UUID(self._withdraw.loads(token)["c"])
        except (BadSignature, KeyError, TypeError, ValueError) as err:
            raise InvitationError("invalid", "the withdrawal link is not valid") from err


def links_for(a: App) -> Links:
    return Links(a.kek)


def invitation_path(token: str) -> str:
    return f"{PORTAL_PREFIX}/i/{token}"


def withdrawal_path(token: str) -> str:
    return f"{PORTAL_PREFIX}/w/{token}"


def absolute(base_url: str, path: str) -> str:
    return (base_url.rstrip("/") + path) if base_url else path


# -- storage --------------------------------------------------------------------------------
def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _row(row: sa.Row) -> Invitation:
    return Invitation(
        id=uuid.UUID(row.id), subject_id=uuid.UUID(row.subject_id),
        channels=tuple(row.channels or ()), valid_days=row.valid_days or 0,
        guardian=bool(row.guardian), biometric=bool(row.biometric), lang=row.lang,
        created_at=datetime.fromisoformat(row.created_at),
        expires_at=datetime.fromisoformat(row.expires_at),
        used_at=datetime.fromisoformat(row.used_at) if row.used_at else None,
        consent_id=uuid.UUID(row.consent_id) if row.consent_id else None,
        request_sha256=row.request_sha256, created_by=row.created_by,
    )


def get(state, invitation_id: uuid.UUID) -> Invitation | None:
    with state.engine.connect() as conn:
        row = conn.execute(
            invitations.select().where(invitations.c.id == str(invitation_id))).first()
    return _row(row) if row else None


def of_subject(state, subject_id: uuid.UUID) -> list[Invitation]:
    """A person's invitations, newest first (for the admin's person page)."""
    with state.engine.connect() as conn:
        rows = conn.execute(invitations.select()
                            .where(invitations.c.subject_id == str(subject_id))
                            .order_by(invitations.c.created_at.desc()))
        return [_row(r) for r in rows]


def by_consent(state, consent_id: uuid.UUID) -> Invitation | None:
    with state.engine.connect() as conn:
        row = conn.execute(invitations.select()
                           .where(invitations.c.consent_id == str(consent_id))).first()
    return _row(row) if row else None


# -- admin side -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Created:
    invitation: Invitation
    token: str
    path: str          # /p/i/<token>
    url: str           # absolute when console.public_url is set, else == path
    mailed: bool = False


def create_invitation(
    a: App,
    subject: Subject,
    *,
    channels: Sequence[str],
    biometric: bool = True,
    valid_days: int | None = None,
    guardian: bool = False,
    lang: str = "en",
    created_by: str | None = None,
    now: datetime | None = None,
) -> Created:
    """Record an invitation and sign its link. A minor's is always answered by a guardian."""
    now = now or a.pipeline.clock()
    vocab = tuple(a.settings.policy.channels)
    unknown = [c for c in channels if c not in vocab]
    if unknown:
        raise ConsentError(f"unknown channel(s) {unknown}; known: {list(vocab)}")
    chosen = tuple(c for c in vocab if c in set(channels))
    if not chosen and not biometric:
        raise ConsentError("an invitation must ask for at least one channel or for biometric "
                           "consent")
    if lang not in LANGS:
        raise ConsentError(f"language must be one of {list(LANGS)}")
    if a.state.subject(subject.id) is None:
        raise ConsentError("no such subject")
    portal = a.settings.portal
    inv = Invitation(
        id=uuid.uuid4(), subject_id=subject.id, channels=chosen,
        valid_days=valid_days or portal.consent_days,
        guardian=bool(guardian) or is_minor(subject, now),
        biometric=biometric, lang=lang, created_at=now,
        expires_at=now + timedelta(days=portal.invitation_days), created_by=created_by,
    )
    if inv.valid_days <= 0:
        raise ConsentError("the consent duration must be at least one day")
    with a.state.begin() as conn:
        conn.execute(invitations.insert().values(
            id=str(inv.id), subject_id=str(inv.subject_id), channels=list(inv.channels),
            valid_days=inv.valid_days, guardian=inv.guardian, biometric=inv.biometric,
            created_by=created_by, lang=inv.lang, created_at=_ts(now),
            expires_at=_ts(inv.expires_at),
        ))
        a.audit.append("invitation.created", subject_id=subject.id, actor="admin", at=now,
                       conn=conn, details={
                           "invitation_id": str(inv.id), "channels": list(inv.channels),
                           "biometric": inv.biometric, "guardian": inv.guardian,
                           "valid_days": inv.valid_days, "expires_at": _ts(inv.expires_at)})
    a.audit.sync_head()
    token = links_for(a).invitation_token(inv.id)
    path = invitation_path(token)
    return Created(inv, token, path, absolute(_base_url(a), path))


def _base_url(a: App) -> str:
    console = getattr(a.settings, "console", None)
    return getattr(console, "public_url", "") or ""


def send_invitation(a: App, mailer: Mailer, created: Created, *, to: str) -> Created:
    """E-mail the link in the invitation's language. The address is not stored anywhere."""
    from plugin.web.i18n import t

    if not created.url.startswith(("http://", "https://")):
        raise ConsentError("set console.public_url so the e-mail can carry a full link")
    lang = created.invitation.lang
    days = a.settings.portal.invitation_days
    mailer.send(to, t(lang, "portal.mail.subject"),
                t(lang, "portal.mail.body", url=created.url, days=days))
    a.audit.append("invitation.sent", subject_id=created.invitation.subject_id, actor="admin",
                   details={"invitation_id": str(created.invitation.id), "by": "email"})
    return Created(created.invitation, created.token, created.path, created.url, mailed=True)


# -- the person's side ----------------------------------------------------------------------
def open_invitation(a: App, token: str, *, now: datetime | None = None) -> Invitation:
    """The invitation behind a link, or InvitationError: invalid, expired, used or unknown."""
    now = now or a.pipeline.clock()
    days = timedelta(days=a.settings.portal.invitation_days)
    inv_id = links_for(a).open_invitation(token, max_age=days)
    inv = get(a.state, inv_id)
    if inv is None or a.state.subject(inv.subject_id) is None:
        # Revoked, or the person was erased since.
        raise InvitationError("unknown", "this invitation no longer exists")
    st = inv.state(now)
    if st == "used":
        raise InvitationError("used", "this invitation has already been answered")
    if st == "expired":
        raise InvitationError("expired", "the invitation link has expired")
    return inv


@dataclass(frozen=True, slots=True)
class Answer:
    """What the person chose and signed in the form."""

    channels: tuple[str, ...]
    biometric: bool
    signed_name: str
    confirmed: bool
    guardian_confirmed: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    invitation: Invitation
    consent: Consent | None
    request_sha256: str
    withdraw_token: str | None
    enrolled: int
    selfie_discarded: bool


def validate_answer(inv: Invitation, answer: Answer) -> None:
    if not answer.signed_name.strip():
        raise AnswerError("portal.error.name", "the signature needs a typed name")
    if len(answer.signed_name) > 200:
        raise AnswerError("portal.error.name", "the typed name is too long")
    if not answer.confirmed:
        raise AnswerError("portal.error.confirm", "the confirmation box is not ticked")
    if inv.guardian and not answer.guardian_confirmed:
        raise AnswerError("portal.error.guardian", "the guardian box is not ticked")
    extra = [c for c in answer.channels if c not in inv.channels]
    if extra:
        raise AnswerError("portal.error.channels", "a channel that was not asked was chosen")
    if answer.biometric and not inv.biometric:
        raise AnswerError("portal.error.channels", "biometric consent was not asked")


def count_faces(a: App, data: bytes) -> int:
    """Faces in an uploaded selfie, by the real engine; the bytes touch disk only in a private
    temporary file that is deleted before this returns."""
    if len(data) > a.settings.portal.max_upload_bytes:
        raise AnswerError("portal.error.selfie_size", "the photo is too large",
                          mb=a.settings.portal.max_upload_bytes // 1_000_000)
    with _private_file(data) as path:
        try:
            image = decode(path, asset="selfie", **a.pipeline.decode_options)
        except ImageError as err:
            raise AnswerError("portal.error.selfie_image", f"selfie: {err.cause}") from err
        return len(a.engine.detect(image))


# Memory-backed where it exists, so the selfie never reaches a disk; mkdtemp makes a 0700
# folder of our own inside it, so the shared location is not a risk.
_SHM = Path("/dev/shm")  # noqa: S108


class _private_file:
    """A 0600 file in a private 0700 temporary folder (in memory when /dev/shm exists) holding
    `data`, for the image decoder and `people.enroll`, which read paths; removed on exit, also
    after an error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.dir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        where = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
        self.dir = tempfile.TemporaryDirectory(prefix="consentry-selfie-", dir=where)
        path = Path(self.dir.name) / "selfie"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.data)
        return path

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            self.dir.cleanup()


def request_document(inv: Invitation, answer: Answer, *, statement_sha256: str,
                     signed_at: datetime, valid_until: datetime, selfie: bool,
                     lang: str) -> bytes:
    """The signed request as canonical JSON: what was asked, what was answered, who, when."""
    doc = {
        "kind": DOCUMENT_KIND,
        "invitation": str(inv.id),
        "subject": str(inv.subject_id),
        "lang": lang,  # the language the person read the request in
        "statement_sha256": statement_sha256,
        "asked": {"channels": list(inv.channels), "biometric": inv.biometric,
                  "valid_until": _ts(valid_until)},
        "given": {"channels": list(answer.channels), "biometric": answer.biometric,
                  "reference_photo": selfie},
        "signed_by": answer.signed_name.strip(),
        "guardian": inv.guardian,
        "signed_at": _ts(signed_at),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def accept(a: App, token: str, answer: Answer, *, selfie: bytes | None = None,
           statement_sha256: str = "", lang: str | None = None,
           now: datetime | None = None) -> Receipt:
    """Record the person's answer once: consent (if anything was granted), selfie enrollment
    (only with biometric consent), invitation claimed. Raises InvitationError / AnswerError;
    on AnswerError nothing is recorded and the link stays usable."""
    now = now or a.pipeline.clock()
    inv = open_invitation(a, token, now=now)
    validate_answer(inv, answer)
    subject = a.state.subject(inv.subject_id)
    if subject is None:
        raise InvitationError("unknown", "this invitation no longer exists")
    use_selfie = bool(selfie) and answer.biometric
    if use_selfie:
        found = count_faces(a, selfie or b"")
        if found != 1:
            raise AnswerError("portal.error.selfie_faces",
                              f"the photo must show exactly one face; found {found}", n=found)
    valid_until = now + timedelta(days=inv.valid_days)
    document = request_document(inv, answer, statement_sha256=statement_sha256, signed_at=now,
                                valid_until=valid_until, selfie=use_selfie,
                                lang=lang or inv.lang)
    digest = hashlib.sha256(document).hexdigest()
    grants = []
    if answer.biometric:
        grants.append(Grant(kind=GrantKind.BIOMETRIC, valid_from=now, valid_until=valid_until))
    if answer.channels:
        grants.append(Grant(kind=GrantKind.PUBLICATION, channels=tuple(answer.channels),
                            valid_from=now, valid_until=valid_until))
    consent = None
    if grants:
        consent = Consent(subject_id=subject.id, document_ref=f"portal:invitation:{inv.id}",
                          document_sha256=digest, signed_at=now,
                          signed_by=answer.signed_name.strip(), guardian=inv.guardian,
                          grants=tuple(grants))
    _claim(a, inv, consent_id=consent.id if consent else None, digest=digest, now=now)
    try:
        if consent is not None:
            people.add_consent(a.state, a.audit, consent, actor=PORTAL_ACTOR)
    except BaseException:
        _unclaim(a, inv)
        raise
    _keep_document(a, subject.id, document, inv)
    a.audit.append("invitation.answered", subject_id=subject.id, actor=PORTAL_ACTOR, at=now,
                   details={"invitation_id": str(inv.id),
                            "consent_id": str(consent.id) if consent else None,
                            "request_sha256": digest, "channels": list(answer.channels),
                            "biometric": answer.biometric, "guardian": inv.guardian})
    if consent is not None:
        apply_change(a, subject.id, reason="portal consent")
    enrolled = 0
    if use_selfie and consent is not None:
        with _private_file(selfie or b"") as path:
            try:
                result = people.enroll(a.state, a.vault, a.audit, a.engine, subject, [path],
                                       now=now, decode_options=a.pipeline.decode_options,
                                       actor=PORTAL_ACTOR)
                enrolled = result.added
            except (EnrollmentError, ConsentError) as err:
                # Checked above, so this is unexpected; the consent stands without a photo.
                log.warning("portal enrollment failed for invitation %s: %s",
                            inv.id, type(err).__name__)
    return Receipt(
        invitation=get(a.state, inv.id) or inv, consent=consent, request_sha256=digest,
        withdraw_token=links_for(a).withdrawal_token(consent.id) if consent else None,
        enrolled=enrolled, selfie_discarded=bool(selfie) and not use_selfie,
    )


def _claim(a: App, inv: Invitation, *, consent_id: uuid.UUID | None, digest: str,
           now: datetime) -> None:
    """Single use, race-free: only the request that flips `used_at` from NULL goes on."""
    with a.state.begin() as conn:
        done = conn.execute(
            invitations.update()
            .where(invitations.c.id == str(inv.id), invitations.c.used_at.is_(None))
            .values(used_at=_ts(now), consent_id=str(consent_id) if consent_id else None,
                    request_sha256=digest)
        ).rowcount
    if done != 1:
        raise InvitationError("used", "this invitation has already been answered")


def _unclaim(a: App, inv: Invitation) -> None:
    with a.state.begin() as conn:
        conn.execute(invitations.update().where(invitations.c.id == str(inv.id))
                     .values(used_at=None, consent_id=None, request_sha256=None))


def _keep_document(a: App, subject_id: uuid.UUID, document: bytes, inv: Invitation) -> None:
    """The signed request, encrypted under the person's key (erasure destroys it), when the
    vault can hold documents (Vault.put_document)."""
    put = getattr(a.vault, "put_document", None)
    if put is None:
        return
    try:
        put(subject_id, document, media_type="application/json",
            filename=f"consent-request-{inv.id}.json")
    except ConsentryError as err:
        log.warning("signed request of invitation %s not kept in the vault: %s",
                    inv.id, type(err).__name__)


# -- withdrawal -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WithdrawalView:
    consent: Consent
    subject: Subject
    active: bool


def open_withdrawal(a: App, token: str, *, now: datetime | None = None) -> WithdrawalView:
    now = now or a.pipeline.clock()
    consent_id = links_for(a).open_withdrawal(token)
    found = [c for c in a.state.consents() if c.id == consent_id]
    subject = a.state.subject(found[0].subject_id) if found else None
    if not found or subject is None:
        # Erased since: nothing is left to withdraw.
        raise InvitationError("unknown", "this consent no longer exists")
    consent = found[0]
    return WithdrawalView(consent, subject, any(g.active_at(now) for g in consent.grants)
                          or any(g.valid_from > now and g.withdrawn_at is None
                                 for g in consent.grants))


@dataclass(frozen=True, slots=True)
class Withdrawn:
    at: datetime
    already: bool
    templates_destroyed: bool


def withdraw(a: App, token: str, *, now: datetime | None = None) -> Withdrawn:
    """Withdraw the whole consent behind a receipt link, exactly as `consents withdraw` does.
    Photos are re-labelled at once (and by the sweep, should a platform be down)."""
    now = now or a.pipeline.clock()
    view = open_withdrawal(a, token, now=now)
    if not view.active:
        return Withdrawn(now, already=True, templates_destroyed=False)
    sid = view.consent.subject_id
    destroyed = people.withdraw_consent(a.state, a.vault, a.audit, view.consent, at=now, now=now,
                                        actor=PORTAL_ACTOR)
    a.audit.append("portal.withdrawal", subject_id=sid, actor=PORTAL_ACTOR, at=now,
                   details={"consent_id": str(view.consent.id),
                            "templates_destroyed": destroyed})
    apply_change(a, sid, reason="consent withdrawn")
    if not standing(view.subject, a.state.consents(sid), now).any_active:
        try:
            # No grant left: platforms that keep person records drop the name too (as the CLI).
            a.pipeline.forget_on_platforms(sid, reason="consent withdrawn")
        except ConsentryError as err:
            log.warning("platforms not told to forget subject %s yet: %s", sid,
                        type(err).__name__)
    return Withdrawn(now, already=False, templates_destroyed=destroyed)


def apply_change(a: App, subject_id: uuid.UUID, *, reason: str) -> int:
    """Re-label the person's analysed photos at once, as the CLI and the console do (stored
    faces, no detection). A platform that is down does not undo the answer: the sweep
    re-labels the same photos later."""
    try:
        return len(a.pipeline.reevaluate(subject_ids=[subject_id], reason=reason))
    except ConsentryError as err:
        log.warning("re-labelling subject %s deferred to the sweep: %s", subject_id,
                    type(err).__name__)
        return 0
