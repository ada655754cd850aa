"""`consentry dpia`: a draft DPIA (Art. 35) and record of processing (Art. 30), generated from the
configuration in force and the state as it is now, so the document a privacy officer signs
describes the system that runs, not the one someone remembers.

`collect` reads (never writes): settings, key source, file modes, the state database, the vault's
subject list, the audit chain. `render` turns those facts into Markdown. The draft names stores,
settings and figures only: no person's name or id appears in it (erasures are listed by date and
counts), because a DPIA is circulated far more widely than the data it describes.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel, SecretStr

from plugin import registry
from plugin import schema as t
from plugin.consent import POLICY_VERSION, has_active_biometric, standing
from plugin.errors import AuditChainError, ConsentryError
from plugin.keys import KEY_ENV
from plugin.models import FaceState, GrantKind, Status
from plugin.settings import MatchingSettings, Settings

if TYPE_CHECKING:
    from plugin.app import App

SWEEP_DUE = timedelta(days=2)  # the service sweeps daily; two days means it is not running
# The point with zero wrong names in every lfw-dev gallery size (benchmarks/README.md).
STRICT_THRESHOLD, STRICT_MARGIN = 0.34, 0.12
LAST_ERASURES = 10
_SECRET_PARTS = frozenset({"token", "secret", "password", "passwd", "key", "apikey", "credentials"})
_NOT_ANALYSED = "not analysed yet"


@dataclass(frozen=True, slots=True)
class Store:
    what: str
    where: str
    protection: str


@dataclass(frozen=True, slots=True)
class Risk:
    title: str
    why: str
    mitigation: str


@dataclass(frozen=True, slots=True)
class Erasure:
    started: str
    finished: str
    assets: int
    foreign_name_assets: int
    templates_destroyed: int
    consents_deleted: int


@dataclass(slots=True)
class Facts:
    generated_at: datetime
    config_file: Path
    engine: str
    connectors: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    stores: list[Store] = field(default_factory=list)
    retention: list[str] = field(default_factory=list)
    thresholds: list[tuple[str, str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    erasures: list[Erasure] = field(default_factory=list)
    risks: list[Risk] = field(default_factory=list)


def redact_url(url: str) -> str:
    """A database URL fit for a document: the password replaced by ***."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(not a valid URL)"


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _mode_text(path: Path) -> str:
    mode = _mode(path)
    return "missing" if mode is None else f"mode {mode:04o}"


def _loose(mode: int | None) -> bool:
    return mode is not None and bool(mode & 0o077)


def _connector_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A connector's settings with defaults applied and credentials hidden."""
    try:
        model: BaseModel = registry.connector_class(str(raw.get("kind"))).Config.model_validate(
            dict(raw))
        values = {name: getattr(model, name) for name in type(model).model_fields}
    except (ConsentryError, ValueError):
        values = dict(raw)
    shown = {}
    for name, value in values.items():
        secret = isinstance(value, SecretStr) or bool(_SECRET_PARTS & set(name.lower().split("_")))
        shown[name] = "(set; not shown)" if secret and value else value
    return shown


# -- collecting --------------------------------------------------------------------------
def collect(a: App, *, env: Mapping[str, str] = os.environ) -> Facts:
    """Facts for the draft from the opened app `a` (settings, state, vault, audit) and `env`."""
    s: Settings = a.settings
    now = a.pipeline.clock()
    facts = Facts(generated_at=now, config_file=a.config_file.absolute(),
                  engine=a.engine.version)
    connectors = []
    for raw in s.connectors:
        values = _connector_settings(raw)
        connector = a.connectors.get(str(values.get("name")))
        if connector is not None and hasattr(connector, "root"):
            values["root"] = connector.root
        connectors.append(values)
        facts.connectors.append((str(values.get("name")), str(values.get("kind"))))
    _stores(facts, a, connectors, env)
    _retention(facts, s)
    _thresholds(facts, s)
    figures = _figures(facts, a, now)
    _erasures(facts, a)
    _risks(facts, a, connectors, env, figures, now)
    return facts


def _stores(facts: Facts, a: App, connectors: Sequence[Mapping[str, Any]],
            env: Mapping[str, str]) -> None:
    s = a.settings
    if KEY_ENV in env:
        key_where = f"environment variable `{KEY_ENV}` (the key file is then not read)"
    else:
        key_where = f"key file `{s.key_file}` ({_mode_text(s.key_file)})"
    facts.stores.append(Store(
        "key-encryption key (KEK)", key_where,
        "32 random bytes, base64; never used directly: HKDF-SHA256 derives one key per purpose "
        "(vault wrapping, vault check, audit MAC, verdict fingerprints)"))
    on_server = a.vault.path is None  # store.vault_url: a PostgreSQL database or schema
    facts.stores.append(Store(
        "face template vault",
        (f"`{a.vault.location}` (" if on_server
         else f"`{s.vault_path}` ({_mode_text(s.vault_path)}; ")
        + f"{len(a.vault.subjects())} subject data key(s))",
        "AES-256-GCM; one data key per subject, wrapped by the KEK; rows bound to subject and "
        "row id; erasure deletes the data key and templates (crypto-shredding), "
        + ("VACUUM FULL rewrites the tables (the server's WAL and backups keep ciphertext "
           "until recycled)" if on_server
           else "secure_delete and VACUUM leave no freed page")))
    state_where = f"`{redact_url(s.state_url)}`"
    state_protection = ("no face vectors; names only in table `subjects`; subjects, consents, "
                        "grants, face records (boxes), asset status, cursors, erasure records")
    if a.state.is_sqlite:
        db = sa.make_url(s.state_url).database
        if db:
            state_where += f" ({_mode_text(Path(db))})"
        state_protection += "; SQLite secure_delete on (deleted rows are overwritten)"
    else:
        state_protection += ("; server database: access, TLS and backups are configured on "
                             "the server, not checked by Consentry")
    facts.stores.append(Store("state database", state_where, state_protection))
    facts.stores.append(Store(
        "audit log", f"table `audit` of the state database; head file `{s.audit_head}` "
        f"({_mode_text(s.audit_head)})",
        "append-only; subject ids only, never names or vectors; each entry HMAC-SHA256 "
        "(key derived from the KEK) over its content and the previous MAC; the latest MAC is "
        "kept in the head file so a cut tail is detected by `consentry audit verify`"))
    for c in connectors:
        kind, name = c.get("kind"), c.get("name")
        mode = c.get("write_mode")
        if mode == "embed":
            where = "XMP embedded in each photo file"
        elif mode == "sidecar":
            naming = "<photo>.xmp" if c.get("sidecar_naming") == "stem" else "<photo>.jpg.xmp"
            where = f"XMP sidecar files beside the photos ({naming})"
        else:
            where = "the platform's own fields and tags"
        location = f" under `{c['root']}`" if c.get("root") else ""
        facts.stores.append(Store(
            f"photo library `{name}` ({kind})", f"{where}{location}; write mode: {mode or '-'}",
            "names only while the consent policy allows, PersonId urn:uuid, "
            "consent ids, model-release status; never vectors"
            + ("; names also as keywords" if a.settings.xmp.names_as_keywords else "")))
    facts.stores.append(Store(
        "signed consent documents", "where each consent's `document_ref` points (outside "
        "Consentry)", "SHA-256 of each document kept in the state database to prove integrity; "
        "the documents' own storage is the controller's"))


def _retention(facts: Facts, s: Settings) -> None:
    facts.retention += [
        "Face templates: only while the subject has an active biometric grant; destroyed on "
        "withdrawal, at expiry by `consentry sweep`, and on erasure."
        + (" Besides reference photos, faces a reviewer confirmed become templates "
           "(`matching.learn_from_review`, at most 3 a person)."
           if s.matching.learn_from_review else ""),
        "Vectors of unknown faces: never stored (only the face's box and state)."
        + (" With `matching.corroborate` on, the vectors of a scan run's unnamed faces stay "
           "in memory until the end of that run (at most 20,000), so that faces the run named "
           "on strong evidence can vouch for the same person's other faces; then they are "
           "dropped." if s.matching.corroborate else ""),
        "Subjects, consents and face records: until the subject is erased "
        "(`consentry subjects erase`); face records follow the photo.",
        "Names in photo metadata: removed when no grant of the subject is active any more, on "
        "withdrawal of all grants and on erasure.",
        "Audit log: kept without a time limit (accountability); it holds ids, never names.",
        "Erasure records: subject id, dates and counts, to finish an interrupted erasure and "
        "prove it happened.",
    ]
    # Settings that bound how long something is kept (e.g. a review queue's days), as they are.
    for section, field_info in type(s).model_fields.items():
        if field_info.exclude:
            continue
        value = getattr(s, section)
        if not isinstance(value, BaseModel):
            continue
        for name in type(value).model_fields:
            if "retention" in name or name.endswith("_days"):
                facts.retention.append(f"Setting `{section}.{name}` = {getattr(value, name)!r}.")


def _thresholds(facts: Facts, s: Settings) -> None:
    m, d = s.matching, MatchingSettings()
    facts.thresholds += [
        ("matching.threshold", f"{m.threshold}", f"{d.threshold}"),
        ("matching.margin", f"{m.margin}", f"{d.margin}"),
        ("matching.review_threshold", f"{m.review_threshold}", f"{d.review_threshold}"),
        ("matching.templates", m.templates, d.templates),
        ("matching.learn_from_review", str(m.learn_from_review).lower(),
         str(d.learn_from_review).lower()),
        ("matching.corroborate", str(m.corroborate).lower(), str(d.corroborate).lower()),
        ("matching.corroborate_anchor", f"{m.corroborate_anchor}", f"{d.corroborate_anchor}"),
        ("matching.corroborate_threshold", f"{m.corroborate_threshold}",
         f"{d.corroborate_threshold}"),
        ("policy.channels", ", ".join(s.policy.channels), "internal … advertising"),
        ("policy version", POLICY_VERSION, POLICY_VERSION),
        ("engine", facts.engine, "-"),
    ]


def _figures(facts: Facts, a: App, now: datetime) -> dict[str, int]:
    subjects = a.state.subjects()
    consents = a.state.consents_by_subject()
    all_consents = [c for items in consents.values() for c in items]
    grants = [g for c in all_consents for g in c.grants]
    active = Counter(g.kind for g in grants if g.active_at(now))
    minors = sum(1 for s in subjects if standing(s, consents.get(s.id, []), now).minor)
    with a.state.engine.connect() as conn:
        statuses = Counter({(r[0] or _NOT_ANALYSED): r[1] for r in conn.execute(
            sa.select(t.assets.c.status, sa.func.count()).group_by(t.assets.c.status))})
        states = Counter({r[0]: r[1] for r in conn.execute(
            sa.select(t.faces.c.state, sa.func.count()).group_by(t.faces.c.state))})
        errors = conn.execute(sa.select(sa.func.count()).select_from(t.assets)
                              .where(t.assets.c.last_error.is_not(None))).scalar_one()
        waiting = conn.execute(sa.select(sa.func.count()).select_from(t.assets)
                               .where(t.assets.c.needs_analysis.is_(True))).scalar_one()
        audit_entries = conn.execute(sa.select(sa.func.count()).select_from(t.audit)
                                     ).scalar_one()
        erasures_done = conn.execute(sa.select(sa.func.count()).select_from(t.erasures)
                                     .where(t.erasures.c.finished_at.is_not(None))).scalar_one()
        erasures_open = conn.execute(sa.select(sa.func.count()).select_from(t.erasures)
                                     .where(t.erasures.c.finished_at.is_(None))).scalar_one()
    figures: dict[str, int] = {
        "subjects": len(subjects),
        "subjects who are minors": minors,
        "consents": len(all_consents),
        "consents signed by a guardian": sum(1 for c in all_consents if c.guardian),
        "active biometric grants": active[GrantKind.BIOMETRIC],
        "active publication grants": active[GrantKind.PUBLICATION],
        "subjects with face templates": len(a.vault.subjects()),
        "assets": sum(statuses.values()),
    }
    for status in [*(s.value for s in Status), _NOT_ANALYSED]:
        figures[f"assets: {status}"] = statuses.get(status, 0)
    figures["assets with an error"] = errors
    figures["assets waiting for analysis"] = waiting
    figures["faces"] = sum(states.values())
    for state in FaceState:
        figures[f"faces: {state.value}"] = states.get(state.value, 0)
    figures["review items (uncertain faces)"] = states.get(FaceState.UNCERTAIN.value, 0)
    figures["audit entries"] = audit_entries
    figures["erasures completed"] = erasures_done
    figures["erasures unfinished"] = erasures_open
    facts.figures += [(k, str(v)) for k, v in figures.items()]
    last = _last_sweep(a)
    facts.figures.append(("last sweep", last.isoformat() if last else "never"))
    return figures


def _last_sweep(a: App) -> datetime | None:
    from plugin.sweep import LAST_SWEEP

    value = a.state.get_meta(LAST_SWEEP)
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def _erasures(facts: Facts, a: App) -> None:
    e = t.erasures
    with a.state.engine.connect() as conn:
        rows = conn.execute(sa.select(e).order_by(e.c.started_at.desc()).limit(LAST_ERASURES))
        for r in rows:
            facts.erasures.append(Erasure(
                started=r.started_at[:10],
                finished=r.finished_at[:10] if r.finished_at else f"unfinished ({r.stage})",
                assets=len(r.assets or []), foreign_name_assets=len(r.foreign_name_assets or []),
                templates_destroyed=r.templates_destroyed, consents_deleted=r.consents_deleted))


def _risks(facts: Facts, a: App, connectors: Sequence[Mapping[str, Any]],
           env: Mapping[str, str], figures: Mapping[str, int], now: datetime) -> None:
    s, add = a.settings, facts.risks.append
    if s.xmp.names_as_keywords:
        add(Risk("Names are written as keywords (`xmp.names_as_keywords = true`)",
                 "Immich and other tools turn keywords into visible tags; keywords travel into "
                 "exports and derivatives where Consentry cannot remove them later.",
                 "Turn it off unless editors need it; names stay in the MWG/IPTC person fields."))
    for c in connectors:
        if c.get("write_mode") == "embed":
            add(Risk(f"Names are embedded in the photo files of `{c.get('name')}`",
                     "Copies, downloads, backups and platform file versions (Nextcloud keeps "
                     "them) keep a name after withdrawal or erasure; Consentry rewrites only "
                     "the current file.",
                     "Use `write_mode = \"sidecar\"` where the platform reads sidecars, and "
                     "bound the retention of versions and backups."))
    if KEY_ENV in env:
        add(Risk(f"The key-encryption key is in the environment (`{KEY_ENV}`)",
                 "Other processes of the same user can read a process's environment, child "
                 "processes inherit it, and CI or container tooling may print it.",
                 "Inject it from a secrets manager at start-up only, never log the "
                 "environment; or use a 0600 key file on a separate volume."))
    else:
        if _loose(_mode(s.key_file)):
            add(Risk(f"The key file `{s.key_file}` is readable by others "
                     f"({_mode_text(s.key_file)})",
                     "Anyone who reads it can decrypt the vault and forge audit entries.",
                     f"`chmod 600 {s.key_file}`."))
        if (a.vault.path is not None
                and s.key_file.parent.resolve() == s.vault_path.parent.resolve()):
            add(Risk("The key file sits beside the vault",
                     "A backup or copy of that folder carries both the ciphertext and the key "
                     "that opens it.",
                     "Keep the key on another volume or in a secrets manager, or exclude it "
                     "from the backup that holds the vault."))
    for label, path in (("vault", s.vault_path), ("audit head file", s.audit_head)):
        if _loose(_mode(path)):
            add(Risk(f"The {label} `{path}` is readable by others ({_mode_text(path)})",
                     "File permissions are the first barrier around the stores.",
                     f"`chmod 600 {path}`."))
    url = sa.make_url(s.state_url)
    if a.state.is_sqlite and url.database and _loose(_mode(Path(url.database))):
        add(Risk(f"The state database is readable by others ({_mode_text(Path(url.database))})",
                 "It holds names, consents and face boxes.",
                 f"`chmod 600 {url.database}`."))
    if url.password:
        add(Risk("The state database password is in the settings file",
                 "Whoever reads the settings file can open the state database.",
                 "Pass it through `CONSENTRY_STORE__STATE_URL` from a secrets manager."))
    if "://" in s.vault_url and sa.make_url(s.vault_url).password:
        add(Risk("The vault database password is in the settings file",
                 "Whoever reads the settings file can read the vault's ciphertext and, with "
                 "the key, the templates.",
                 "Pass it through `CONSENTRY_STORE__VAULT_URL` from a secrets manager."))
    _setting_risks(facts, s)
    d = MatchingSettings()
    if s.matching.threshold > d.threshold or s.matching.margin < d.margin:
        add(Risk("Recognition is looser than the measured defaults "
                 f"(threshold {s.matching.threshold}, margin {s.matching.margin})",
                 "A wrong name on a face is a privacy incident; the defaults were chosen by "
                 "measurement on lfw-dev.",
                 f"Return to threshold {d.threshold} / margin {d.margin} unless a measurement "
                 "on your own photos supports the change."))
    elif s.matching.threshold > STRICT_THRESHOLD:
        add(Risk(f"Auto-naming at threshold {s.matching.threshold} can name a look-alike "
                 "stranger when few people are enrolled",
                 "On lfw-dev, galleries of 3-50 people showed about 7 wrong names per million "
                 "stranger-face x person comparisons at 0.41 (README, 'Accuracy').",
                 f"For zero wrong names in every lfw-dev gallery size set threshold "
                 f"{STRICT_THRESHOLD} / margin {STRICT_MARGIN}; more faces then go to review."))
    consents = a.state.consents_by_subject()
    stale = [sid for sid in a.vault.subjects()
             if not has_active_biometric(consents.get(sid, []), now)]
    if stale:
        add(Risk(f"{len(stale)} subject(s) have face templates without an active biometric "
                 "grant", "Templates may exist only while biometric consent is active.",
                 "Run `consentry sweep` (daily from cron or the service)."))
    last = _last_sweep(a)
    if last is None or now - last > SWEEP_DUE:
        add(Risk("The sweep is not running (" + ("never run" if last is None else
                                                 f"last run {last.date().isoformat()}") + ")",
                 "Consents that expire are applied to the photos only by the sweep: until "
                 "then editors may see a name or status that is no longer true.",
                 "Run `consentry sweep` daily (cron or `consentry serve`)."))
    if figures["erasures unfinished"]:
        add(Risk(f"{figures['erasures unfinished']} erasure(s) are unfinished",
                 "Part of a person's data may still be in the stores or the photos.",
                 "Run `consentry subjects erase` again for each; it resumes where it stopped."))
    if figures["review items (uncertain faces)"]:
        add(Risk(f"{figures['review items (uncertain faces)']} face(s) wait for review",
                 "Their photos show status `review` and are not cleared for publication.",
                 "Work through `consentry review list`."))
    if figures["subjects who are minors"]:
        add(Risk(f"{figures['subjects who are minors']} registered subject(s) are minors",
                 "Children's data merits specific protection (GDPR recital 38); a guardian must "
                 "sign their consents.",
                 "Check the guardian signatures and keep their publication channels narrow."))
    if figures["assets with an error"]:
        add(Risk(f"{figures['assets with an error']} photo(s) could not be analysed",
                 "Their metadata may not reflect the current consents.",
                 "See `consentry report` (column error) and rescan."))
    try:
        a.audit.verify()
    except AuditChainError as err:
        add(Risk("The audit log does not verify", str(err),
                 "Investigate before relying on the log; restore from a trusted backup."))


def _setting_risks(facts: Facts, s: Settings) -> None:
    """A review queue that keeps vectors of unknown faces (when such a setting is on)."""
    review = getattr(s, "review", None)
    if not isinstance(review, BaseModel):
        return
    kept = {name: getattr(review, name) for name in type(review).model_fields
            if "retention" in name or name.endswith("_days") or name in ("enabled",
                                                                          "keep_vectors")}
    switched_off = any(kept.get(k) is False for k in ("enabled", "keep_vectors"))
    if not switched_off and any(v for v in kept.values() if isinstance(v, bool | int | float)):
        shown = ", ".join(f"`review.{k}` = {v!r}" for k, v in kept.items())
        facts.risks.append(Risk(
            "The review queue keeps vectors of unknown faces (" + shown + ")",
            "Biometric data of people who gave no consent is stored for the retention period.",
            "Keep the retention short, or turn the queue off."))


# -- rendering ---------------------------------------------------------------------------
def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def render(f: Facts) -> str:
    when = f.generated_at.isoformat(timespec="seconds")
    libraries = ", ".join(f"`{n}` ({k})" for n, k in f.connectors) or "none configured"
    out = [
        "# Consentry: draft DPIA and record of processing",
        "",
        f"> Draft generated by `consentry dpia` on {when} from `{f.config_file}` and the state "
        "database. Figures are as of that moment. To complete: controller and DPO contacts, "
        "the assessment of necessity and proportionality, recipients beyond the libraries "
        "listed, and sign-off.",
        "",
        "## 1. Record of processing (GDPR Art. 30)",
        "",
        *_table(("item", "entry"), [
            ("controller", "_to be completed_"),
            ("purposes", "Tell editors who is shown in each photo and whether and where the "
             "photo may be published, from the signed quitclaims; recognise faces "
             "automatically only for people who gave explicit biometric consent."),
            ("categories of data subjects", "people registered by the admin (staff, models, "
             "guests, including minors with a guardian's signature); people depicted in the "
             "photos who are not registered (their faces are detected, never recognised)"),
            ("categories of personal data", "face images (the photos); biometric templates "
             "(special category, Art. 9(1)); names, birth date or minor flag, platform ids; "
             "consent documents and their grants; face positions and recognition results; "
             "audit entries by id"),
            ("legal basis", "biometric recognition: explicit consent, Art. 9(2)(a); "
             "publication: consent (quitclaim), Art. 6(1)(a); records and audit: Art. 6(1)(c) "
             "accountability, Art. 5(2)"),
            ("recipients", f"editors of the libraries: {libraries}"),
            ("transfers", "none by Consentry: detection and recognition run locally"),
            ("retention", "see section 4"),
            ("security measures", "see sections 3 and 9"),
            ("automated decisions", "names are proposed and written automatically only under "
             "an active biometric grant; uncertain matches go to human review; no decision "
             "with legal effect is made"),
        ]),
        "## 2. Data categories",
        "",
        *_table(("category", "what", "where"), [
            ("face images", "photos in the connected libraries", libraries),
            ("biometric templates", "128-d face vectors of subjects with biometric consent",
             "face template vault"),
            ("names and subject details", "display name, birth date or minor flag, platform "
             "ids", "state database, table `subjects` only"),
            ("consent documents", "signed quitclaims: reference, SHA-256, signer, grants",
             "state database (records); documents where referenced"),
            ("face records", "box, state, distance, candidates: never a vector",
             "state database"),
            ("metadata written to photos", "names allowed by the policy, PersonId, consent ids, "
             "status", "XMP in files or sidecars per library"),
            ("audit log", "who did what to which subject id or asset, when",
             "state database + head file"),
        ]),
        "## 3. Where each kind of data lives and how it is protected",
        "",
        *_table(("store", "location", "protection"),
                [(s.what, s.where, s.protection) for s in f.stores]),
        "## 4. Retention",
        "",
        *[f"- {line}" for line in f.retention],
        "",
        "## 5. Recognition settings",
        "",
        *_table(("setting", "value", "default"), f.thresholds),
        f"## 6. Figures (state at {when})",
        "",
        *_table(("figure", "value"), f.figures),
        "## 7. Last erasures (Art. 17)",
        "",
    ]
    if f.erasures:
        out += _table(("started", "finished", "assets touched",
                       "assets with the name in others' fields", "templates destroyed",
                       "consents deleted"),
                      [(e.started, e.finished, e.assets, e.foreign_name_assets,
                        e.templates_destroyed, e.consents_deleted) for e in f.erasures])
    else:
        out += ["No erasure recorded.", ""]
    out += ["## 8. Open risks (derived from the configuration and state)", ""]
    if f.risks:
        for i, r in enumerate(f.risks, 1):
            out += [f"{i}. **{r.title}.** {r.why} _Mitigation:_ {r.mitigation}"]
        out.append("")
    else:
        out += ["None found in the configuration and state; the assessment in section 10 "
                "still applies.", ""]
    out += [
        "## 9. Measures in place",
        "",
        "- Local processing: photos, faces and templates never leave the machine.",
        "- Recognition only of subjects with an active biometric grant; templates destroyed "
        "when the last one ends.",
        "- Encrypted template vault (AES-256-GCM, per-subject data keys, crypto-shredding).",
        "- No vector of an unknown face is stored.",
        "- Names shown only while a grant of the subject is active; removed from what "
        "Consentry wrote on withdrawal, expiry of all grants and erasure.",
        "- Tamper-evident audit log by id (`consentry audit verify`, `consentry audit "
        "export`).",
        "- Data-subject rights as commands: `consentry subjects export` (Art. 15, 20), "
        "`consentry subjects erase` (Art. 17), `consentry consents withdraw` (Art. 7(3)).",
        "",
        "## 10. Necessity and proportionality (to be completed by the controller)",
        "",
        "- Why automatic recognition is needed rather than manual tagging.",
        "- Who may register subjects and record consents; how quitclaims are collected.",
        "- How data subjects are informed (Art. 13/14), including people who are not "
        "registered.",
        "- Residual risk after the measures above, and whether prior consultation (Art. 36) "
        "is needed.",
        "",
    ]
    return "\n".join(out)


def generate(a: App, *, env: Mapping[str, str] = os.environ) -> str:
    return render(collect(a, env=env))
