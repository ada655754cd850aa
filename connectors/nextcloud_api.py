"""Nextcloud wire format: WebDAV request bodies and multi-status parsing (with defusedxml).

Kept apart from the connector so the XML details (namespaces, URL-encoded hrefs, the SearchDAV
paging element) can be read and tested on their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote, urlsplit
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

D, OC, NC = "DAV:", "http://owncloud.org/ns", "http://nextcloud.org/ns"
SEARCHDAV = "https://github.com/icewind1991/SearchDAV/ns"
_NS = f'xmlns:d="{D}" xmlns:oc="{OC}" xmlns:nc="{NC}"'

# What every listing asks for. The photo metadata properties give the original's geometry
# without downloading it (Nextcloud 28+); older servers omit them and we read the file instead.
FILE_PROPS = (
    "d:getetag", "d:getlastmodified", "d:getcontenttype", "d:getcontentlength",
    "d:resourcetype", "oc:fileid", "oc:size", "oc:checksums", "nc:upload_time",
    "nc:metadata-photos-size", "nc:metadata-photos-ifd0",
)
TAG_PROPS = ("oc:id", "oc:display-name", "oc:user-visible", "oc:user-assignable")


class DavXmlError(ValueError):
    """A multi-status body that is not well-formed (truncated, or not XML at all)."""


def _prop_xml(props: tuple[str, ...]) -> str:
    return "<d:prop>" + "".join(f"<{p}/>" for p in props) + "</d:prop>"


def propfind_body(props: tuple[str, ...] = FILE_PROPS) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><d:propfind {_NS}>{_prop_xml(props)}'
            "</d:propfind>").encode()


def search_body(*, scope: str, prop: str, literal: str, limit: int, offset: int) -> bytes:
    """SEARCH for images under `scope` whose `prop` is greater than `literal`, one page.

    Ordered by fileid as well as by mtime so that pages are stable while files keep changing.
    """
    return f"""<?xml version="1.0" encoding="utf-8"?>
<d:searchrequest {_NS} xmlns:ns="{SEARCHDAV}"><d:basicsearch>
<d:select>{_prop_xml(FILE_PROPS)}</d:select>
<d:from><d:scope><d:href>{escape(scope)}</d:href><d:depth>infinity</d:depth></d:scope></d:from>
<d:where><d:and>
<d:gt><d:prop><{prop}/></d:prop><d:literal>{escape(literal)}</d:literal></d:gt>
<d:like><d:prop><d:getcontenttype/></d:prop><d:literal>image/%</d:literal></d:like>
</d:and></d:where>
<d:orderby><d:order><d:prop><d:getlastmodified/></d:prop><d:ascending/></d:order>
<d:order><d:prop><oc:fileid/></d:prop><d:ascending/></d:order></d:orderby>
<d:limit><d:nresults>{limit}</d:nresults><ns:firstresult>{offset}</ns:firstresult></d:limit>
</d:basicsearch></d:searchrequest>""".encode()


@dataclass(frozen=True, slots=True)
class DavEntry:
    """One `d:response` of a multi-status: an href and its found (200) properties."""

    href: str  # decoded path, e.g. /remote.php/dav/files/admin/Photos/a b.jpg
    props: dict[str, str]
    collection: bool

    def get(self, name: str) -> str | None:
        return self.props.get(name)

    @property
    def etag(self) -> str:
        return (self.props.get("d:getetag") or "").strip('"')

    @property
    def fileid(self) -> str | None:
        return self.props.get("oc:fileid") or None

    @property
    def size(self) -> int | None:
        raw = self.props.get("d:getcontentlength") or self.props.get("oc:size")
        return int(raw) if raw and raw.isdigit() else None

    @property
    def sha1(self) -> str | None:
        """SHA1 from `oc:checksums` ("SHA1:… MD5:…"), when the server computed one."""
        for item in (self.props.get("oc:checksums") or "").split():
            algo, _, value = item.partition(":")
            if algo.upper() == "SHA1" and value:
                return value.lower()
        return None

    @property
    def modified(self) -> datetime | None:
        raw = self.props.get("d:getlastmodified")
        try:
            return parsedate_to_datetime(raw) if raw else None
        except (TypeError, ValueError):
            return None

    def stored_size(self) -> tuple[int, int] | None:
        try:
            size = json.loads(self.props.get("nc:metadata-photos-size") or "")
            return int(size["width"]), int(size["height"])
        except (ValueError, KeyError, TypeError):
            return None

    def orientation(self) -> int | None:
        try:
            value = int(json.loads(self.props.get("nc:metadata-photos-ifd0") or "")["Orientation"])
        except (ValueError, KeyError, TypeError):
            return None
        return value if 1 <= value <= 8 else None


_PREFIX = {D: "d", OC: "oc", NC: "nc"}


def _short(tag: str) -> str:
    ns, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return f"{_PREFIX.get(ns, ns)}:{local}"


def _text(el: Element) -> str:
    if len(el):  # structured value (resourcetype, system-tags): child names or texts
        return " ".join((c.text or _short(c.tag)).strip() for c in el)
    return (el.text or "").strip()


def parse_multistatus(body: bytes) -> list[DavEntry]:
    """Entries of a 207 body; raises DavXmlError when the body is not a multi-status."""
    try:
        root = ElementTree.fromstring(body)
    except (ElementTree.ParseError, DefusedXmlException) as err:
        raise DavXmlError(f"malformed multi-status XML ({type(err).__name__})") from err
    if root.tag != f"{{{D}}}multistatus":
        raise DavXmlError(f"expected d:multistatus, got {_short(root.tag)}")
    entries = []
    for response in root.findall(f"{{{D}}}response"):
        # Split before decoding: a name may hold '?' or '#' once decoded.
        href = unquote(urlsplit(response.findtext(f"{{{D}}}href") or "").path)
        props: dict[str, str] = {}
        collection = False
        for propstat in response.findall(f"{{{D}}}propstat"):
            status = propstat.findtext(f"{{{D}}}status") or ""
            if " 200 " not in f"{status} ":
                continue
            for prop in propstat.findall(f"{{{D}}}prop"):
                for child in prop:
                    props[_short(child.tag)] = _text(child)
                    if child.tag == f"{{{D}}}resourcetype":
                        collection = child.find(f"{{{D}}}collection") is not None
        entries.append(DavEntry(href=href, props=props, collection=collection))
    return entries
