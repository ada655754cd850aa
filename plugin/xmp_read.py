"""Read Consentry's XMP tags without exiftool, for packets exiftool itself wrote.

Re-labelling reads every changed file twice (before and after the write); through exiftool each
read costs ~5 ms of Perl. `read_tags` parses the packet in Python instead and returns what
`exiftool -j -struct -G1` would print for the tags in `SUPPORTED`: the same keys, lists, and
JSON value forms (numbers and true/false as exiftool prints them unquoted, dates converted as
exiftool converts them, PLUS codes without their vocabulary URI, structure fields named as
exiftool names them).

It does so only for what it can answer exactly, and returns None for anything else, so the
caller asks exiftool instead:

- the packet must be one exiftool serialised (`x:xmptk='Image::ExifTool …'`): the RDF forms it
  writes, its namespace prefixes, no comments, CDATA, DOCTYPE, nodeIDs or carriage returns;
- our tags must use the forms listed in `SUPPORTED` (structure fields included); an unknown
  field, a lang-alt in another language, an empty element, a list of 1000 items or more (exiftool
  stops at 1000) all mean None;
- a JPEG must hold at most one standard XMP segment and no other place exiftool reads XMP from
  (Extended XMP, a Photoshop or EXIF block carrying XMP, a recognised trailer), and end with EOI;
- a sidecar must be the packet and nothing else.

A JPEG without any XMP gives every tag absent, as exiftool reports it.

Safety: a packet holding `<!` anywhere is refused before any parsing, so it has no DOCTYPE and
therefore no entity declarations: nothing can expand (billion laughs) or be fetched (external
entities), and expat rejects any other entity reference as undefined. That is why the C
accelerated ElementTree parser is used rather than defusedxml, whose guards need the pure
Python parser (4x slower here; the reader runs twice per re-labelled file).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, XMLParser

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XML_NS = "http://www.w3.org/XML/1998/namespace"
META = "adobe:ns:meta/"
XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\0"
_HEAD_CHUNK = 1 << 16
_MAX_ITEMS = 1000  # exiftool extracts only the first 1000 items of a list

# The namespaces we read, under the prefix exiftool writes for each.
_NAMESPACES = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
    "plus": "http://ns.useplus.org/ldf/xmp/1.0/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "digiKam": "http://www.digikam.org/ns/1.0/",
    "mwg-rs": "http://www.metadataworkinggroup.com/schemas/regions/",
    "stArea": "http://ns.adobe.com/xmp/sType/Area#",
    "stDim": "http://ns.adobe.com/xap/1.0/sType/Dimensions#",
    "consentry": "http://ns.consentry.org/xmp/1.0/",
    "rdf": RDF,
    "x": META,
}


class _Unsupported(Exception):
    """Something this reader does not answer exactly: exiftool must."""


# -- value conversions, as exiftool applies them ------------------------------------------
# Perl's `$` also matches before a final newline: `\n?\Z` stands for it.
_JSON_BOOL = re.compile(r"(?:true|false)\n?\Z", re.IGNORECASE | re.ASCII)
_JSON_NUMBER = re.compile(
    r"-?(?:\d|[1-9]\d{1,14})(?:\.\d{1,16})?(?:e[-+]?\d{1,3})?\n?\Z", re.IGNORECASE | re.ASCII
)
_XMP_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}:\d{2})(:\d{2})?\s*(\S*)\n?\Z", re.ASCII
)
_XMP_DATE_START = re.compile(r"\d{4}(?:-\d{2}){0,2}", re.ASCII)
# exiftool's PLUS ValueConv: s{http://ns.useplus.org/ldf/vocab/}{} (unanchored, dots unescaped)
_PLUS_VOCAB = re.compile(r"http://ns.useplus.org/ldf/vocab/")


def json_value(text: str) -> Any:
    """What `exiftool -j` prints for `text`, as `json.loads(..., parse_float=Decimal)` reads it.

    exiftool prints true/false (any case) as JSON booleans and number-like text unquoted
    (EscapeJSON in the exiftool script): a Name "1234" comes back as the int 1234.
    """
    if _JSON_BOOL.match(text):
        return text[0] in "tT"
    if _JSON_NUMBER.match(text):
        return json.loads(text, parse_float=Decimal)
    return text


def _date(text: str) -> str:
    """exiftool's ConvertXMPDate for a tag written as 'date'."""
    if m := _XMP_DATE.match(text):
        return f"{m[1]}:{m[2]}:{m[3]} {m[4]}{m[5] or ''}{m[6]}"
    if _XMP_DATE_START.match(text):
        return text.replace("-", ":")
    return text


def _plus_code(text: str) -> str:
    return _PLUS_VOCAB.sub("", text, count=1)


def _closed(*values: str) -> Callable[[str], str]:
    """A PrintConv table that maps each value to itself; any other value exiftool would
    print as 'Unknown (…)': not answered here."""

    def convert(text: str) -> str:
        if text not in values:
            raise _Unsupported(f"value {text!r} outside a closed choice")
        return text

    return convert


def _same(text: str) -> str:
    return text


# -- what each supported tag may hold -----------------------------------------------------
class _Spec:
    """One property: `form` is text, list (Bag/Seq of text), langalt (x-default only), struct
    or structs (Bag of structures, `fields` by (namespace prefix, local name))."""

    def __init__(self, form: str, convert: Callable[[str], str] = _same,
                 fields: dict[tuple[str, str], _Spec] | None = None) -> None:
        self.form, self.convert = form, convert
        # by ElementTree tag ("{uri}local"): exiftool's field name (ucfirst) and its spec
        self.fields = {
            f"{{{_NAMESPACES[prefix]}}}{local}": (local[:1].upper() + local[1:], spec)
            for (prefix, local), spec in (fields or {}).items()
        }


_TEXT, _LIST, _LANGALT = _Spec("text"), _Spec("list"), _Spec("langalt")
_AREA = _Spec("struct", fields={
    ("stArea", name): _TEXT for name in ("x", "y", "w", "h", "d", "unit")
})
_DIMENSIONS = _Spec("struct", fields={("stDim", name): _TEXT for name in ("w", "h", "unit")})
_REGION_FIELDS = {
    ("mwg-rs", "Area"): _AREA,
    ("mwg-rs", "Type"): _Spec("text", _closed("Face", "Pet", "Focus", "BarCode")),
    ("mwg-rs", "Name"): _TEXT,
    ("mwg-rs", "Description"): _TEXT,
    ("mwg-rs", "BarCodeValue"): _TEXT,
    ("mwg-rs", "Rotation"): _TEXT,
}
_REGION_INFO = _Spec("struct", fields={
    ("mwg-rs", "AppliedToDimensions"): _DIMENSIONS,
    ("mwg-rs", "RegionList"): _Spec("structs", fields=_REGION_FIELDS),
})
_PERSON_DETAILS = _Spec("structs", fields={
    ("Iptc4xmpExt", "PersonId"): _LIST,
    ("Iptc4xmpExt", "PersonName"): _LANGALT,
})

# Keyed by the argument XmpWriter passes to exiftool (`#`: no print conversion).
SUPPORTED: dict[str, tuple[tuple[str, str], _Spec]] = {
    "XMP-mwg-rs:RegionInfo": (("mwg-rs", "Regions"), _REGION_INFO),
    "XMP-iptcExt:PersonInImage": (("Iptc4xmpExt", "PersonInImage"), _LIST),
    "XMP-iptcExt:PersonInImageWDetails": (("Iptc4xmpExt", "PersonInImageWDetails"),
                                          _PERSON_DETAILS),
    "XMP-plus:ModelReleaseStatus#": (("plus", "ModelReleaseStatus"), _Spec("text", _plus_code)),
    "XMP-plus:ModelReleaseID": (("plus", "ModelReleaseID"), _LIST),
    "XMP-plus:MinorModelAgeDisclosure#": (("plus", "MinorModelAgeDisclosure"),
                                          _Spec("text", _plus_code)),
    "XMP-lr:HierarchicalSubject": (("lr", "hierarchicalSubject"), _LIST),
    "XMP-digiKam:TagsList": (("digiKam", "TagsList"), _LIST),
    "XMP-consentry:Status": (("consentry", "Status"), _TEXT),
    "XMP-consentry:Channels": (("consentry", "Channels"), _LIST),
    "XMP-consentry:ValidUntil": (("consentry", "ValidUntil"), _Spec("text", _date)),
    "XMP-consentry:ConsentIDs": (("consentry", "ConsentIDs"), _LIST),
    "XMP-consentry:Unidentified": (("consentry", "Unidentified"), _TEXT),
    "XMP-consentry:Engine": (("consentry", "Engine"), _TEXT),
    "XMP-consentry:Regions": (("consentry", "Regions"), _LIST),
    "XMP-consentry:NameKeywords": (("consentry", "NameKeywords"), _TEXT),
    "XMP-dc:Subject": (("dc", "subject"), _LIST),
    "XMP-dc:Description": (("dc", "description"), _LANGALT),
}
_BY_PROPERTY = {
    f"{{{_NAMESPACES[prefix]}}}{local}": (arg.removesuffix("#"), spec)
    for arg, ((prefix, local), spec) in SUPPORTED.items()
}


# -- reading ------------------------------------------------------------------------------
def read_tags(path: Path, *, sidecar: bool) -> dict[str, Any] | None:
    """What `exiftool -j -struct -G1` prints for the `SUPPORTED` tags of `path`, keyed by
    group-qualified name (absent tags left out), or None when exiftool must answer.

    `sidecar`: `path` is an XMP file (whatever its suffix), else a JPEG. OSError propagates.
    """
    try:
        packet = _sidecar_packet(path) if sidecar else _jpeg_packet(path)
        return {} if packet is None else _parse_packet(packet)
    except _Unsupported:
        return None


def _sidecar_packet(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(b"<?xpacket begin=") or not data.rstrip().endswith(b"?>"):
        raise _Unsupported("not a bare XMP packet")
    return data


def _jpeg_packet(path: Path) -> bytes | None:
    """The standard XMP packet of a JPEG (None: none), reading only the head and the tail."""
    packets: list[bytes] = []
    with path.open("rb") as handle:
        buf = handle.read(_HEAD_CHUNK)
        if not buf.startswith(b"\xff\xd8"):
            raise _Unsupported("not a JPEG")
        pos = 2
        while True:
            while len(buf) < pos + 4:
                more = handle.read(_HEAD_CHUNK)
                if not more:
                    raise _Unsupported("truncated before the image data")
                buf += more
            if buf[pos] != 0xFF:
                raise _Unsupported("marker expected")
            marker = buf[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no payload
                pos += 2
                continue
            if marker in (0xD8, 0xD9):
                raise _Unsupported("unexpected SOI/EOI before the image data")
            length = int.from_bytes(buf[pos + 2:pos + 4], "big")
            if length < 2:
                raise _Unsupported("bad segment length")
            end = pos + 2 + length
            while len(buf) < end:
                more = handle.read(max(_HEAD_CHUNK, end - len(buf)))
                if not more:
                    raise _Unsupported("truncated segment")
                buf += more
            if marker == 0xDA:  # start of scan: no metadata after it (but a trailer)
                break
            payload = buf[pos + 4:end]
            if marker == 0xE1 and payload.startswith(XMP_APP1):
                packets.append(payload[len(XMP_APP1):])
            elif _may_hold_xmp(payload):
                raise _Unsupported("XMP in a segment exiftool reads otherwise")
            pos = end
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64))
        tail = handle.read()
    if not tail.endswith(b"\xff\xd9") or _TRAILER.search(tail):
        raise _Unsupported("no EOI at the end, or a trailer")
    if len(packets) > 1:
        raise _Unsupported("several XMP segments")
    return packets[0] if packets else None


def _may_hold_xmp(payload: bytes) -> bool:
    """A segment exiftool may read XMP from: APP1 XMP with another header (Extended XMP
    too), a Photoshop block or EXIF ApplicationNotes holding a packet, and the like."""
    return payload.startswith((b"http", b"XMP\0")) or any(
        mark in payload for mark in (b"<?xpacket", b"<exif:", b"xmpmeta", b"rdf:RDF",
                                     b"ns.adobe.com/xap")
    )


# Trailers exiftool recognises at the end of a file (IdentifyTrailer), some carrying XMP.
_TRAILER = re.compile(
    rb"AXS[!*].{8}\Z|\xa1\xb2\xc3\xd4\Z|cbipcbbl\Z|CANON OPTIONAL DATA\0|~\0\x04\0zmie~"
    rb"|\0\0(?:QDIOBS|SEFT)\Z|8db42d694ccc418790edff439fe026bf\Z|/NIKON APP\Z",
    re.DOTALL,
)
_XMLNS = re.compile(rb"""xmlns:([^\s=]+)\s*=\s*(['"])(.*?)\2""", re.DOTALL)
_DEFAULT_XMLNS = re.compile(rb"xmlns\s*=")
_VERSION = re.compile(rb"/\d+\.\d+(?=/|$)")


def _uri_key(uri: bytes) -> bytes:
    """A namespace URI as exiftool recognises it: any version number, trailing slash or not."""
    return _VERSION.sub(b"/#", uri).rstrip(b"/")


def _exiftool_key(tag: str) -> tuple[str, str]:
    """An ElementTree tag as exiftool names the tag: an all-uppercase name is lower-cased
    (GetXMPTagID), and tag names are matched without regard to case."""
    uri, _, local = tag[1:].partition("}")
    if not re.search("[a-z]", local):
        local = re.sub("_([a-z])", lambda m: m[1].upper(), local.lower())
    return uri, local.lower()

_OUR_PROPERTY_KEYS = frozenset(_exiftool_key(tag) for tag in _BY_PROPERTY)
_OUR_URI_KEYS = frozenset(
    _uri_key(uri.encode()) for uri in _NAMESPACES.values()
)


def _parse_packet(packet: bytes) -> dict[str, Any]:
    # Forms exiftool never writes, and which its regex parser reads differently from an XML
    # parser (comments and CDATA kept in values, \r kept, blank nodes re-attached).
    if b"<!" in packet or b"\r" in packet or b"nodeID" in packet:
        raise _Unsupported("declaration, comment, CDATA, CR or nodeID")
    if packet.count(b"<?") != packet.count(b"<?xpacket "):
        raise _Unsupported("processing instruction")
    # exiftool escapes every '<', '>' and quote in values (EscapeXML), so each '>' closes a tag;
    # a raw '>' in a value would end a tag early for exiftool's parser, not for an XML parser.
    if packet.count(b"<") != packet.count(b">"):
        raise _Unsupported("a raw '>' in a value")
    if _DEFAULT_XMLNS.search(packet):
        raise _Unsupported("a default namespace")  # exiftool reads unprefixed names as such
    for prefix, _, uri in _XMLNS.findall(packet):
        known = _NAMESPACES.get(prefix.decode("utf-8", "replace"))
        if known is not None:
            if known.encode() != uri:
                raise _Unsupported("one of our prefixes for another namespace")
        elif _uri_key(uri) in _OUR_URI_KEYS:
            # exiftool also maps a URI with(out) a trailing slash or another version number
            # onto the standard namespace (ParseXMPElement)
            raise _Unsupported("one of our namespaces under another prefix")
    try:
        parser = XMLParser()  # noqa: S314  (no DOCTYPE, refused above: no entity can exist)
        parser.feed(packet)
        root = parser.close()
    except Exception as err:  # ParseError, undefined entities, bad encodings
        raise _Unsupported(f"not well-formed: {err}") from err
    if root.tag != _XMPMETA or not root.get(_XMPTK, "").startswith("Image::ExifTool "):
        raise _Unsupported("not serialised by exiftool")
    if len(root) != 1 or root[0].tag != _RDF_RDF or root[0].attrib:
        raise _Unsupported("unexpected x:xmpmeta content")
    doc: dict[str, Any] = {}
    for description in root[0]:
        if description.tag != _RDF_DESCRIPTION or (
            description.attrib and set(description.attrib) != {_RDF_ABOUT}
        ):
            raise _Unsupported("unexpected rdf:RDF content")
        for prop in description:
            known = _BY_PROPERTY.get(prop.tag)
            if known is None:
                if _exiftool_key(prop.tag) in _OUR_PROPERTY_KEYS:
                    raise _Unsupported(f"{prop.tag} reads as one of our tags in exiftool")
                continue
            name, spec = known
            if name in doc:
                raise _Unsupported("a property given twice")
            doc[name] = _value(prop, spec)
    return doc


_XMPMETA, _XMPTK = f"{{{META}}}xmpmeta", f"{{{META}}}xmptk"
_RDF_RDF, _RDF_DESCRIPTION, _RDF_ABOUT = f"{{{RDF}}}RDF", f"{{{RDF}}}Description", f"{{{RDF}}}about"
_RDF_LI, _RDF_ALT = f"{{{RDF}}}li", f"{{{RDF}}}Alt"
_LISTS = frozenset({f"{{{RDF}}}Bag", f"{{{RDF}}}Seq"})
_RESOURCE = {f"{{{RDF}}}parseType": "Resource"}
_X_DEFAULT = {f"{{{XML_NS}}}lang": "x-default"}


def _value(element: Element, spec: _Spec) -> Any:
    """The value of a property or field (text between child elements is ignored, as exiftool
    ignores it)."""
    form = spec.form
    if form == "text":
        if element.attrib or len(element) or not element.text:
            raise _Unsupported("not a plain value")
        return json_value(spec.convert(element.text))
    if form == "struct":
        return _struct(element, spec)
    if element.attrib or len(element) != 1:
        raise _Unsupported("not a list")
    container = element[0]
    if container.tag != _RDF_ALT if form == "langalt" else container.tag not in _LISTS:
        raise _Unsupported("unexpected list container")
    if container.attrib or not 0 < len(container) < _MAX_ITEMS:
        raise _Unsupported("empty, huge or odd list")
    if form == "langalt":
        if len(container) != 1 or container[0].attrib != _X_DEFAULT:
            raise _Unsupported("lang-alt other than one x-default")
        return _leaf(container[0], spec)
    if form == "list":
        return [_leaf(li, spec) if not li.attrib else _refuse(li) for li in container]
    return [_struct(li, spec) if li.tag == _RDF_LI else _refuse(li) for li in container]


def _refuse(element: Element) -> Any:
    raise _Unsupported(f"unexpected attributes on {element.tag}")


def _leaf(element: Element, spec: _Spec) -> Any:
    if element.tag != _RDF_LI or len(element) or not element.text:
        raise _Unsupported("empty, nested or odd item")
    return json_value(spec.convert(element.text))


def _struct(element: Element, spec: _Spec) -> dict[str, Any]:
    if element.attrib != _RESOURCE or not len(element):
        raise _Unsupported("not a parseType='Resource' structure")
    out: dict[str, Any] = {}
    fields = spec.fields
    for child in element:
        known = fields.get(child.tag)
        if known is None:
            raise _Unsupported(f"unknown structure field {child.tag}")
        key, field = known
        if key in out:
            raise _Unsupported(f"repeated structure field {child.tag}")
        out[key] = _value(child, field)
    return dict(sorted(out.items()))
